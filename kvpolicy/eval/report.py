"""Summaries of a run's records, the tables printed after a run, and ``kvpolicy eval compare``.

Scores keep each benchmark's reference scale: needle recall 0..1 (as FastKV reports it), RULER and LongBench
0..100. A summary is always recomputed from the records, so a row can only ever show its own run.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpolicy.eval.store import iter_run_dirs, read_meta, read_records, slug

BUCKETS = ("0-4k", "4-8k", "8k+")


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.fmean(vals) if vals else float("nan")


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(text))]


def depth_label(depth: float) -> str:
    return f"{round(100 * float(depth))}%"


def summarize(benchmark: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate scores of ``records`` (see the module docstring for scales)."""
    out: dict[str, Any] = {"n": len(records)}
    if not records:
        return out
    kv = [r["kv_tokens_mean"] for r in records if isinstance(r.get("kv_tokens_mean"), (int, float))]
    share = [
        r["prefill_token_share"] for r in records if isinstance(r.get("prefill_token_share"), (int, float))
    ]
    out["kv_tokens_mean"] = _mean(kv) if kv else None
    kv_bytes = [
        r["kv_bytes_per_token"] for r in records if isinstance(r.get("kv_bytes_per_token"), (int, float))
    ]
    out["kv_bytes_per_token"] = _mean(kv_bytes) if kv_bytes else None
    out["prefill_token_share"] = _mean(share) if share else None
    if benchmark == "needle":
        cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            cells[str(r["length"])][depth_label(r["depth"])].append(float(r["score"]))
        out["grid"] = {
            length: {d: _mean(v) for d, v in sorted(row.items(), key=lambda kv: natural_key(kv[0]))}
            for length, row in sorted(cells.items(), key=lambda kv: natural_key(kv[0]))
        }
        out["by_length"] = {
            length: _mean(r["score"] for r in records if str(r["length"]) == length) for length in out["grid"]
        }
        out["score"] = _mean(r["score"] for r in records)
        out["found"] = _mean(float(bool(r.get("needle_found"))) for r in records)
    elif benchmark == "ruler":
        grid: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            grid[r["task"]][str(r["length"])].append(float(r["score"]))
        out["grid"] = {
            task: {n: _mean(v) for n, v in sorted(row.items(), key=lambda kv: natural_key(kv[0]))}
            for task, row in grid.items()
        }
        out["by_task"] = {task: _mean(row.values()) for task, row in out["grid"].items()}
        lengths = sorted({n for row in out["grid"].values() for n in row}, key=natural_key)
        out["by_length"] = {n: _mean(row[n] for row in out["grid"].values() if n in row) for n in lengths}
        out["score"] = _mean(out["by_task"].values())
    elif benchmark == "longbench":
        by_task: dict[str, list[float]] = defaultdict(list)
        buckets: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            by_task[r["task"]].append(float(r["score"]))
            buckets[r["task"]][r.get("bucket", "")].append(float(r["score"]))
        out["by_task"] = {task: _mean(v) for task, v in by_task.items()}
        out["count"] = {task: len(v) for task, v in by_task.items()}
        out["buckets"] = {
            task: {b: _mean(row[b]) for b in BUCKETS if b in row} for task, row in buckets.items()
        }
        out["truncated"] = sum(bool(r.get("truncated")) for r in records)
        out["score"] = _mean(out["by_task"].values())
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")
    return out


def _fmt(value: Any, benchmark: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.2f}" if benchmark == "needle" else f"{value:.1f}"


def run_table(benchmark: str, summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one run's summary."""
    if not summary.get("n"):
        return ["result"], [["no records"]]
    if benchmark == "needle":
        depths = sorted({d for row in summary["grid"].values() for d in row}, key=natural_key)
        header = ["length", *depths, "mean"]
        rows = [
            [
                length,
                *[_fmt(row.get(d), benchmark) for d in depths],
                _fmt(summary["by_length"][length], benchmark),
            ]
            for length, row in summary["grid"].items()
        ]
        rows.append(["all", *[""] * len(depths), _fmt(summary["score"], benchmark)])
        return header, rows
    if benchmark == "ruler":
        lengths = list(summary["by_length"])
        header = ["task", *lengths, "mean"]
        rows = [
            [task, *[_fmt(row.get(n), benchmark) for n in lengths], _fmt(summary["by_task"][task], benchmark)]
            for task, row in summary["grid"].items()
        ]
        rows.append(
            [
                "average",
                *[_fmt(summary["by_length"][n], benchmark) for n in lengths],
                _fmt(summary["score"], benchmark),
            ]
        )
        return header, rows
    present = [b for b in BUCKETS if any(b in row for row in summary["buckets"].values())]
    header = ["task", "n", "score", *present]
    rows = [
        [
            task,
            str(summary["count"][task]),
            _fmt(score, benchmark),
            *[_fmt(summary["buckets"][task].get(b), benchmark) for b in present],
        ]
        for task, score in summary["by_task"].items()
    ]
    rows.append(["average", str(summary["n"]), _fmt(summary["score"], benchmark), *[""] * len(present)])
    return header, rows


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- compare ---------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    dir: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def benchmark(self) -> str:
        return str(self.meta.get("benchmark"))

    @property
    def label(self) -> str:
        return str(self.meta.get("label") or self.dir.name)

    @property
    def total(self) -> int:
        return int(self.meta.get("samples_total") or 0)

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"


def load_runs(paths: Sequence[Path]) -> list[RunInfo]:
    runs = []
    for run_dir in iter_run_dirs([Path(p) for p in paths]):
        meta = read_meta(run_dir)
        if not meta or meta.get("benchmark") not in ("needle", "ruler", "longbench"):
            continue
        records, _ = read_records(run_dir / "records.jsonl")
        runs.append(RunInfo(run_dir, meta, records, summarize(meta["benchmark"], records)))
    return merge_shards(runs)


def merge_shards(runs: Sequence[RunInfo]) -> list[RunInfo]:
    """Runs with the shards of one configuration (``--shard i/n``) merged into one run each.

    The merged run is complete only when all ``n`` shards are there and complete; its records are the
    shards' records (each sample once), its summary recomputed from them.
    """
    merged: list[RunInfo] = []
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        shard = run.meta.get("shard")
        if shard:
            if shard["whole_key"] not in groups:
                groups[shard["whole_key"]] = []
                merged.append(run)  # placeholder, replaced below (keeps the order of first sight)
            groups[shard["whole_key"]].append(run)
        else:
            merged.append(run)
    for whole_key, parts in groups.items():
        count = int(parts[0].meta["shard"]["count"])
        indices = {int(p.meta["shard"]["index"]) for p in parts}
        records = list({r["id"]: r for p in parts for r in p.records}.values())
        meta = {
            **parts[0].meta,
            "key": whole_key,
            "status": "complete"
            if indices == set(range(count)) and all(p.complete for p in parts)
            else "running",
            "samples_total": sum(p.total for p in parts) if indices == set(range(count)) else None,
            "samples_done": len(records),
            "shard": None,
            "shards": {"count": count, "found": sorted(indices), "dirs": [str(p.dir) for p in parts]},
        }
        benchmark = str(meta.get("benchmark"))
        run = RunInfo(parts[0].dir.parent, meta, records, summarize(benchmark, records))
        merged[merged.index(parts[0])] = run
    return merged


def _labels(runs: Sequence[RunInfo]) -> list[str]:
    models = {str(r.meta.get("model", {}).get("name")) for r in runs}
    labels = [(f"{r.meta.get('model', {}).get('name')}: " if len(models) > 1 else "") + r.label for r in runs]
    counts = defaultdict(int)
    for label in labels:
        counts[label] += 1
    return [
        f"{lab} [{r.meta.get('key', '')[:6]}]" if counts[lab] > 1 else lab
        for lab, r in zip(labels, runs, strict=True)
    ]


def compare_table(benchmark: str, runs: Sequence[RunInfo]) -> tuple[list[str], list[list[str]]]:
    """One row per run: the scores broken down the benchmark's way, and the run's completeness."""
    labels = _labels(runs)
    if benchmark == "needle":
        cols = sorted({n for r in runs for n in r.summary.get("by_length", {})}, key=natural_key)
        header = ["policy", *[f"{n} tok" for n in cols], "mean", "found", *COST_HEADER, "samples"]
        rows = [
            [
                label,
                *[_fmt(r.summary.get("by_length", {}).get(n), benchmark) for n in cols],
                _fmt(r.summary.get("score"), benchmark),
                f"{round(r.summary.get('found', 0) * r.summary['n'])}/{r.summary['n']}"
                if r.summary["n"]
                else "-",
                *_cost(r),
                _progress(r),
            ]
            for label, r in zip(labels, runs, strict=True)
        ]
    elif benchmark == "ruler":
        tasks = list(dict.fromkeys(t for r in runs for t in r.summary.get("by_task", {})))
        lengths = sorted({n for r in runs for n in r.summary.get("by_length", {})}, key=natural_key)
        header = ["policy", *tasks, *[f"{n} tok" for n in lengths], "mean", *COST_HEADER, "samples"]
        rows = [
            [
                label,
                *[_fmt(r.summary.get("by_task", {}).get(t), benchmark) for t in tasks],
                *[_fmt(r.summary.get("by_length", {}).get(n), benchmark) for n in lengths],
                _fmt(r.summary.get("score"), benchmark),
                *_cost(r),
                _progress(r),
            ]
            for label, r in zip(labels, runs, strict=True)
        ]
    else:
        tasks = list(dict.fromkeys(t for r in runs for t in r.summary.get("by_task", {})))
        header = ["policy", *tasks, "mean", *COST_HEADER, "samples"]
        rows = [
            [
                label,
                *[_fmt(r.summary.get("by_task", {}).get(t), benchmark) for t in tasks],
                _fmt(r.summary.get("score"), benchmark),
                *_cost(r),
                _progress(r),
            ]
            for label, r in zip(labels, runs, strict=True)
        ]
    return header, rows


#: Cost columns: mean KV entries kept per layer and KV head; KV bytes kept per prompt token (all layers
#: and KV heads, as stored: quantized entries count codes and scales); token-layers processed in
#: prefill vs. full.
COST_HEADER = ("KV/layer", "KV B/token", "prefill work")


def _cost(run: RunInfo) -> list[str]:
    kv, share = run.summary.get("kv_tokens_mean"), run.summary.get("prefill_token_share")
    per_token = run.summary.get("kv_bytes_per_token")
    return [
        "-" if kv is None else f"{kv:.0f}",
        "-" if per_token is None else f"{per_token:,.0f}",
        "-" if share is None else f"{share:.0%}",
    ]


def _progress(run: RunInfo) -> str:
    n = run.summary.get("n", 0)
    return str(n) if run.complete else f"{n}/{run.total or '?'} (unfinished)"


def sort_runs(runs: Sequence[RunInfo]) -> list[RunInfo]:
    """Group by benchmark (needle, ruler, longbench), then policy label in natural order."""
    order = {"needle": 0, "ruler": 1, "longbench": 2}
    return sorted(runs, key=lambda r: (order.get(r.benchmark, 9), natural_key(r.label)))


def compare(paths: Sequence[Path], out: Path | None = None, console: Any = None) -> dict[str, Any]:
    """Print one table per benchmark across the runs found under ``paths``; write ``compare.md`` and
    plots to ``out``. Returns ``{benchmark: {"header", "rows", "plots"}}``."""
    from rich.console import Console

    from kvpolicy.eval import plots

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 200  # logs and pipes: do not wrap wide tables
    runs = sort_runs(load_runs(paths))
    if not runs:
        raise FileNotFoundError(f"no evaluation runs (run.json) under {', '.join(str(p) for p in paths)}")
    result: dict[str, Any] = {}
    md: list[str] = ["# kvpolicy eval compare\n"]
    for benchmark in ("needle", "ruler", "longbench"):
        group = [r for r in runs if r.benchmark == benchmark]
        if not group:
            continue
        header, rows = compare_table(benchmark, group)
        scale = "needle recall 0-1" if benchmark == "needle" else "score 0-100"
        console.print(rich_table(header, rows, f"{benchmark} ({scale})"))
        md += [f"## {benchmark} ({scale})\n", markdown_table(header, rows)]
        written: list[Path] = []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            written = plots.compare_plots(benchmark, group, _labels(group), out)
            md += [f"![{p.stem}]({p.name})\n" for p in written]
        result[benchmark] = {"header": header, "rows": rows, "plots": written}
    if out is not None:
        (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
        console.print(
            f"wrote {out / 'compare.md'} and {sum(len(v['plots']) for v in result.values())} plot(s)"
        )
    return result


def plot_name(prefix: str, label: str) -> str:
    return f"{prefix}-{slug(label)}.png"
