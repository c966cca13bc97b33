"""Where evaluation runs live on disk, and how they survive being interrupted.

A run is keyed by the SHA-256 of its full configuration (benchmark, its settings and data
fingerprint, the policy's ``to_dict()``, the model): ``OUT/<benchmark>/<label>-<key[:12]>/`` holds

- ``records.jsonl``: one JSON object per finished sample, appended and ``fsync``-ed as each finishes;
- ``run.json``: the resolved configuration, policy, model, library versions, git commit, progress and,
  once finished, the summary (written atomically: temporary file, then rename).

Runs with different keys never share a folder, so nothing overwrites another setting's results. On
restart an unfinished run resumes: finished samples are read back and skipped; a torn last line (the
process died mid-write) is cut off the file first. A finished run is skipped unless forced. A lock
file stops two processes from writing the same run at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Bumped when prompts or scoring change incompatibly, so old results are not mixed with new ones.
EVAL_FORMAT = 1
RECORDS = "records.jsonl"
META = "run.json"
LOCK = ".lock"


class StoreError(ValueError):
    """A results folder is unusable (corrupt beyond a torn last line, or locked by another process)."""


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_key(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (key order does not matter)."""
    return hashlib.sha256(canonical_json({"eval_format": EVAL_FORMAT, **config}).encode()).hexdigest()


def slug(label: str, limit: int = 60) -> str:
    """A folder-safe version of a run label (``snapkv kv_budget=128`` -> ``snapkv_kv_budget=128``)."""
    text = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip("_.")
    return (text or "run")[:limit]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def find_run_dir(out: Path, benchmark: str, key: str) -> Path | None:
    """An existing folder of run ``key`` under ``out/benchmark``, whatever label it was created with."""
    parent = out / benchmark
    if not parent.is_dir():
        return None
    for candidate in sorted(parent.glob(f"*-{key[:12]}")):
        meta = read_meta(candidate)
        if meta is not None and meta.get("key") == key:
            return candidate
    return None


def read_meta(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / META
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise StoreError(
            f"{path} is not valid JSON ({exc}); delete the folder or rerun with --force"
        ) from None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path: Path, repair: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """Records of a results file and whether its last line was torn (a write cut short).

    A torn last line is ignored (and cut off the file when ``repair``); an unreadable line anywhere
    else is an error naming it. Records repeating an earlier ``id`` are dropped (first one wins).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    torn = False
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if _parse(tail) is not None:  # complete record, only the newline is missing
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            data += b"\n"
        else:
            torn = True
            data = data[:cut]
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            raise StoreError(
                f"{path}, line {number}: not a JSON record ({line[:60]!r}...); "
                "the file was edited or corrupted: delete it or rerun with --force"
            )
        rid = str(record.get("id"))
        if rid in seen:
            continue
        seen.add(rid)
        records.append(record)
    return records, torn


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


class RunStore:
    """One run's folder: its records file (append-only, fsync per record) and its ``run.json``."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.records_path = self.dir / RECORDS
        self.meta_path = self.dir / META
        self._fh: Any = None
        self._lock: Any = None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> RunStore:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        handle = open(self.dir / LOCK, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreError(
                f"another process is writing {self.dir} (its lock is held); wait for it to finish"
            ) from None
        self._lock = handle  # the OS releases it if this process dies, even by SIGKILL

    # -- records --------------------------------------------------------------------------------
    def load(self) -> tuple[list[dict[str, Any]], bool]:
        """Finished records, cutting off a torn last line; ``(records, torn)``."""
        return read_records(self.records_path, repair=True)

    def reset(self) -> None:
        """Forget every record (``--force``)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        with contextlib.suppress(FileNotFoundError):
            self.records_path.unlink()
        for extra in self.dir.iterdir():
            if extra.suffix == ".png":
                extra.unlink()

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably: written in one call, flushed and fsync-ed before returning."""
        if self._fh is None:
            self._fh = open(self.records_path, "a", encoding="utf-8")  # noqa: SIM115
        self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    # -- metadata -------------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        return read_meta(self.dir)

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json_atomic(self.meta_path, meta)


def iter_run_dirs(paths: list[Path]) -> Iterator[Path]:
    """Run folders (holding ``run.json``) at or below each of ``paths``, each once, in argument order."""
    seen: set[Path] = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such results folder: {path}")
        found = [path] if (path / META).is_file() else sorted(p.parent for p in path.rglob(META))
        for run_dir in found:
            resolved = run_dir.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield run_dir
