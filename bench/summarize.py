"""One summary of every ``kvpolicy bench`` JSON in a folder (what ``bench/gpu-h200.sh`` prints last).

Reads the JSON files only (no kvpolicy import, no torch), so it also runs on a stage's partial
output: the bench rewrites its JSON after every prompt length. Two Markdown tables: latency rows
(one per stage, variant and length) and throughput rows (one per stage, variant and length, with
tokens/s at each batch size and the ratio to full KV's tokens/s at each one's largest batch).

    python bench/summarize.py bench/out
    python bench/summarize.py bench/out --require b1 throughput   # exit 1 unless both measured something
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _ratio(row: dict[str, Any], key: str) -> str:
    measured = (row.get("speedup") or {}).get(key)
    if measured is None:
        return "-"
    bound = (row.get("bound") or {}).get(key)
    if (
        bound
        and row["variant"] not in ("fullkv", "fullkv (eager)")
        and not row["variant"].startswith("transformers")
    ):
        return f"{measured:.2f}x ({bound:.2f}x)"
    return f"{measured:.2f}x"


def _median(stats: dict[str, float] | None, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return "-" if not stats else fmt.format(stats["median"] * scale)


def latency_table(files: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = ["stage", "decode", "variant", "length", "batch", "prefill s", "prefill x (bound)"]
    head += ["decode ms/tok", "decode x (bound)", "decode bound ms (reached)", "KV MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, data in files:
        for r in data.get("results", []):
            share = r.get("decode_bound_share")
            bound = "-"
            if r.get("decode_bound_ms") is not None:
                bound = f"{r['decode_bound_ms']:.2f}" + (f" ({share:.0%})" if share is not None else "")
            path = data.get("decode", "eager")
            if r["variant"].endswith("(eager)") or r["variant"].startswith("transformers (DynamicCache)"):
                path = "eager"
            elif r["variant"].startswith("transformers (StaticCache"):
                path = "compiled"
            cells = [stage, path, f"`{r['variant']}`", str(r["length"]), str(r.get("batch", 1))]
            cells += [_median(r.get("prefill_s"), fmt="{:.3f}"), _ratio(r, "prefill")]
            cells += [_median(r.get("decode_ms_per_token")), _ratio(r, "decode"), bound]
            cells += [f"{r['kv_bytes'] / 2**20:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def throughput_table(files: list[tuple[str, dict[str, Any]]]) -> list[str]:
    sizes: list[Any] = []
    for _, data in files:
        sizes += [b for b in data.get("batch_sizes", []) if b not in sizes]
    head = ["stage", "variant", "length", "fit"] + [f"tok/s @{b}" for b in sizes]
    head += ["vs full KV at max (bound)", "KV MiB/seq"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, data in files:
        groups: dict[tuple[str, int], dict[Any, dict[str, Any]]] = {}
        for c in data.get("results", []):
            groups.setdefault((c["variant"], c["length"]), {})[c["requested"]] = c
        for (variant, length), group in groups.items():
            first = next(iter(group.values()))
            cells = [stage, f"`{variant}`", str(length), str(first["fits"])]
            for b in sizes:
                c = group.get(b)
                if c is None:
                    cells.append("")
                elif c.get("tokens_per_s") is None:
                    cells.append("OOM" if c["status"] == "out of memory" else "-")
                else:
                    text = f"{c['tokens_per_s']['median']:.4g}"
                    if b == "max":
                        text += f" (b={c['batch']}" + (f", OOM at {c['oom']}" if c.get("oom") else "") + ")"
                    cells.append(text)
            top = group.get("max") or {}
            ratio = "-"
            if top.get("vs_full_max") is not None:
                bound = top.get("vs_full_max_bound")
                ratio = f"{top['vs_full_max']:.2f}x" + (f" ({bound:.2f}x)" if bound else "")
            cells += [ratio, f"{first['kv_bytes_per_sequence'] / 2**20:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def summarize(folder: Path) -> str:
    files = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:  # a stage killed mid-write
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "results" in data:
            files.append((path.stem, data))
    latency = [(s, d) for s, d in files if not d.get("throughput")]
    throughput = [(s, d) for s, d in files if d.get("throughput")]
    out = []
    if files:
        m = files[0][1].get("machine", {})
        measured = m.get("measured", {})
        out.append(
            f"machine: {m.get('gpu') or m.get('device', '?')}, torch {m.get('torch', '?')}, "
            f"read {measured.get('read_bytes_per_s', 0) / 1e9:.0f} GB/s, "
            f"matmul {measured.get('matmul_flops_per_s', 0) / 1e12:.3g} TFLOP/s; "
            f"model {files[0][1].get('model')} ({files[0][1].get('dtype')})"
        )
    if latency:
        out += ["", "latency (median; x = speed-up over full KV on the same decode path, (bound)):", ""]
        out += latency_table(latency)
    if throughput:
        out += ["", "throughput (generated tokens/s of the whole batch; b = sequences at max):", ""]
        out += throughput_table(throughput)
    if not files:
        out.append(f"no bench JSON in {folder}")
    return "\n".join(out)


def missing(folder: Path, stages: list[str]) -> list[str]:
    """The stages among ``stages`` whose JSON in ``folder`` is absent or unreadable, or has no row with
    a measured figure (tokens/s of a batch that ran, or a prefill or decode time)."""
    out = []
    for stage in stages:
        try:
            data = json.loads((folder / f"{stage}.json").read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        rows = data.get("results") if isinstance(data, dict) else None
        keys = ("tokens_per_s", "prefill_s", "decode_ms_per_token")
        if not rows or not any(r.get(k) for r in rows for k in keys):
            out.append(stage)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="bench/out", type=Path)
    parser.add_argument(
        "--require", nargs="+", default=[], metavar="STAGE", help="exit 1 unless each has measured rows"
    )
    args = parser.parse_args()
    print(summarize(args.folder))
    lacking = missing(args.folder, args.require)
    if lacking:
        print(f"no measured rows in {args.folder} for: {' '.join(lacking)}", file=sys.stderr)
        sys.exit(1)
