"""Plots (matplotlib, from the ``eval`` extra): the needle heatmap (length x depth) per policy, and the
comparison charts ``kvpolicy eval compare`` writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpolicy.eval.report import natural_key, plot_name


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'kvpolicy[eval]'") from exc
    return plt


def have_matplotlib() -> bool:
    try:
        _pyplot()
    except ImportError:
        return False
    return True


def needle_heatmap(grid: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Heatmap of needle recall: context length on x, needle depth on y (0 % at the top)."""
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    lengths = sorted(grid, key=natural_key)
    depths = sorted({d for row in grid.values() for d in row}, key=natural_key)
    data = [[grid[n].get(d, float("nan")) for n in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(4.2, 1.6 + 0.9 * len(lengths)), max(3.0, 1.0 + 0.42 * len(depths))))
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            if value == value:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(series: dict[str, dict[str, float]], path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, points in series.items():
        xs = sorted(points, key=natural_key)
        ax.plot([int(x) if x.isdigit() else x for x in xs], [points[x] for x in xs], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(series: dict[str, dict[str, float]], path: Path, ylabel: str, title: str) -> Path:
    plt = _pyplot()
    groups = list(dict.fromkeys(k for points in series.values() for k in points))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(groups) * max(1, len(series) / 3)), 4.0))
    for i, (label, points) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [points.get(g, 0.0) for g in groups], width=width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Marker of each storage width in :func:`score_by_kv_bytes`.
_WIDTH_MARKERS = {
    "16-bit": "o",
    "int8": "s",
    "fp8": "D",
    "int4": "^",
    "int2": "v",
    "kivi4": "P",
    "kivi2": "X",
}


def _width_label(storage: dict[str, Any]) -> str:
    """:attr:`KVStorage.label <kvpolicy.storage.KVStorage.label>` of a stored policy's storage dict
    (read here without torch)."""
    if not storage:
        return "16-bit"
    if storage.get("layout") == "kivi":
        return f"kivi{storage['bits']}"
    return "fp8" if storage.get("format") == "fp8" else f"int{storage['bits']}"


def score_by_kv_bytes(runs: Sequence[Any], path: Path, ylabel: str, title: str) -> Path | None:
    """Score against KV bytes kept per prompt token (log scale), one line per method and storage width
    (a method's budgets at one width joined), so settings of equal memory compare straight across:
    fewer entries at 16 bits beside more at 4. ``None`` unless two runs report their bytes."""
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in runs:
        per_token, score = run.summary.get("kv_bytes_per_token"), run.summary.get("score")
        if not isinstance(per_token, (int, float)) or not isinstance(score, (int, float)):
            continue
        policy = run.meta.get("policy") or {}
        storage = policy.get("storage") or {}
        width = _width_label(storage)
        name = policy.get("name") or (policy.get("cache") or {}).get("kind") or run.label
        lines.setdefault((str(name), width), []).append((float(per_token), float(score)))
    if sum(len(v) for v in lines.values()) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    # a colour per method, a marker per width: the lines stay apart however many there are
    methods = list(dict.fromkeys(name for name, _ in sorted(lines)))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for (name, width), points in sorted(lines.items()):
        points.sort()
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            marker=_WIDTH_MARKERS.get(width, "o"),
            color=colours[name],
            label=f"{name} {width}",
        )
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}K" if x >= 1000 else f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV bytes kept per prompt token (all layers and KV heads, as stored)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_plots(benchmark: str, runs: Sequence[Any], labels: Sequence[str], out: Path) -> list[Path]:
    """The comparison plots for one benchmark's runs (``report.RunInfo``), written under ``out``."""
    written: list[Path] = []
    runs_labels = [(r, lab) for r, lab in zip(runs, labels, strict=True) if r.summary.get("n")]
    if not runs_labels:
        return written
    ylabel = "recall" if benchmark == "needle" else "score"
    by_bytes = score_by_kv_bytes(
        [r for r, _ in runs_labels],
        out / f"{benchmark}-by-kv-bytes.png",
        ylabel,
        f"{benchmark}: score and KV memory",
    )
    if by_bytes is not None:
        written.append(by_bytes)
    if benchmark == "needle":
        for run, label in runs_labels:
            written.append(needle_heatmap(run.summary["grid"], out / plot_name("needle", label), label))
        series = {label: run.summary["by_length"] for run, label in runs_labels}
        written.append(
            _lines(series, out / "needle-by-length.png", "context length (tokens)", "recall", "needle recall")
        )
    elif benchmark == "ruler":
        written.append(
            _bars(
                {lab: r.summary["by_task"] for r, lab in runs_labels},
                out / "ruler-by-task.png",
                "score",
                "RULER",
            )
        )
        series = {label: run.summary["by_length"] for run, label in runs_labels}
        written.append(
            _lines(series, out / "ruler-by-length.png", "context length (tokens)", "score", "RULER average")
        )
    else:
        written.append(
            _bars(
                {lab: r.summary["by_task"] for r, lab in runs_labels},
                out / "longbench-by-task.png",
                "score",
                "LongBench",
            )
        )
    return written


def leaderboard_plot(
    series: dict[str, dict[float, float]],
    path: Path,
    title: str,
    ceiling: tuple[str, float] | None = None,
) -> Path:
    """kvpress's leaderboard plot: score against compression ratio (fraction of the cache removed), one
    line per method (the legend says its settings), full KV as a dashed horizontal line: the ceiling."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*X<>h"
    # Fixed axes; the legend (one line per method, with its settings) goes below them and the saved
    # image grows to hold it, so many methods never squeeze the plot.
    fig = plt.figure(figsize=(9.0, 5.0))
    ax = fig.add_axes((0.08, 0.1, 0.9, 0.82))
    xs_all = sorted({x for points in series.values() for x in points})
    if ceiling is not None:
        ax.axhline(ceiling[1], color="black", linestyle="--", linewidth=1.2, label=ceiling[0])
    for i, (label, points) in enumerate(series.items()):
        xs = sorted(points)
        ax.plot(
            xs,
            [points[x] for x in xs],
            marker=markers[i % len(markers)],
            color=cmap(i % 20),
            linewidth=1.4,
            markersize=5,
            label=label,
        )
    if xs_all:
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel("compression ratio (fraction of the KV cache removed)")
    ax.set_ylabel("score (average over tasks, 0-100)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), borderaxespad=0.0, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
