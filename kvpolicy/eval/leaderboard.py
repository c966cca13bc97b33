"""``kvpolicy eval leaderboard``: kvpress's leaderboard protocol in one command.

kvpress's public leaderboard (NVIDIA/kvpress ``evaluation/leaderboard.sh``, ``evaluate.py``,
``benchmarks/ruler/``) evaluates every press on RULER at 4K tokens (``data_dir="4096"``, its 13 tasks:
eight needle-in-a-haystack variants, variable tracking, common- and frequent-word extraction and two
QA tasks), with the context compressed *before* the question is seen (``query_aware: false``: the
question is answered from the compressed cache), greedy decoding, and RULER's ``string_match_all``
(``string_match_part`` for QA) per task, averaged over the tasks. Its x-axis is the *compression
ratio*: the fraction of the KV cache removed.

Here the same protocol runs as one command over kvpolicy's presets: every (method, ratio) cell is an
ordinary query-agnostic RULER run (:func:`kvpolicy.eval.runner.run_eval` with
``query_agnostic=True``), so each is keyed by its whole configuration, resumes where it stopped,
shards with ``--shard i/n`` and shows up in ``kvpolicy eval compare``. A ratio ``r`` becomes the
preset's ``kv_budget = 1 - r`` (kvpolicy budgets are the fraction of the context *kept*). Full KV runs
once, as the ceiling. The table (method x ratio, the average over tasks, and per task) and the plot
(score against compression ratio, one line per method, full KV as a horizontal line, every method's
resolved settings in the legend) are built from what the results folder holds, so a shard or an
interrupted run shows what exists, marked unfinished.

Where this differs from kvpress's leaderboard (also in docs/evaluation.md):

- RULER's samples are generated on the fly with the model's own tokenizer and chat template
  (:mod:`kvpolicy.eval.ruler`), not read from kvpress's dataset (made with Llama-3.1's tokenizer and
  no template); the two QA tasks (SQuAD/HotpotQA files) are not generated, so the mix is RULER's 11
  synthetic tasks. Answers are capped at 64 new tokens (RULER: 128 for needles, 120 for cwe).
- Ratios default to 0.1, 0.25, 0.5, 0.75, 0.9 (kvpress's script runs 0.25, 0.5, 0.75, 0.875; pass
  ``--ratios`` for those).
- The default methods are every registered preset that takes ``kv_budget`` (the registry decides, so
  a preset added later is picked up by the next run; already finished cells are skipped). Presets
  without a ``kv_budget`` (DuoAttention, whose ratio is a share of heads) are not on the ratio axis.
- On the embedded SmolLM2-135M-Instruct, the default length is :data:`EMBEDDED_LENGTH` and the
  default tasks :data:`EMBEDDED_TASKS`: a length and the tasks where that model still answers with
  full KV (measured, docs/results.md: its needle tasks answer at 512, 1K and 2K tokens; vt, cwe, fwe
  and the distractor-needle tasks fail uncompressed, so they cannot tell methods apart). 512 is the
  length at which every registered method at five ratios fits in about half an hour of one CPU thread;
  ``--length 1024`` or ``2048`` gives longer contexts, where it still answers. Any other model
  defaults to 4096 tokens and all 11 tasks, as the leaderboard.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpolicy.eval import report
from kvpolicy.eval.store import slug

#: kvpress's leaderboard length (``data_dir="4096"``), the default for every model but the embedded one.
LEADERBOARD_LENGTH = 4096
#: The embedded model's default length: it answers there with full KV (as at 1K and 2K, measured:
#: docs/results.md, "kvpress leaderboard protocol on the embedded model"), and the whole grid (every
#: registered method at five ratios) fits in about half an hour of one CPU thread.
EMBEDDED_LENGTH = 512
#: The RULER tasks the embedded model answers with full KV at 1-2K tokens (docs/results.md); the other
#: five (niah_multikey_2/3 with distractor needles, vt, cwe, fwe) fail uncompressed already.
EMBEDDED_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multivalue",
    "niah_multiquery",
)
#: Compression ratios (fractions of the cache removed), as the leaderboard's plot spans them.
DEFAULT_RATIOS = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Samples per task and ratio (kvpress runs its whole dataset: 500 per task at 4K).
DEFAULT_SAMPLES = 5
#: The order the default methods are listed in, where registered: kvpress's leaderboard order first
#: (its ``leaderboard.sh``), then the rest of the registry in its own order. Only an ordering: which
#: methods run is what the registry holds.
PREFERRED_ORDER = (
    "kvzip",
    "ada-kvzip",
    "expected_attention",
    "ada-expected_attention",
    "criticalkv",
    "criticaladakv",
    "compactor",
    "ada-compactor",
    "snapkv",
    "ada-snapkv",
    "pyramidkv",
    "keydiff",
    "lagkv",
    "qfilters",
    "tova",
    "streamingllm",
    "keynorm",
    "random",
)
FULL = "fullkv"


# -- what runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A preset and the settings given for it (``kv_budget`` is the ratio's to set)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in self.options.items())


def budget_for(ratio: float) -> float:
    """kvpress's compression ratio (fraction *removed*) as a kvpolicy ``kv_budget`` (fraction *kept*):
    ``1 - ratio``, rounded to 6 decimals so 0.9 gives 0.1, not 0.09999999999999998."""
    check_ratio(ratio)
    return round(1.0 - float(ratio), 6)


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(
            f"compression ratio {ratio!r}: must be strictly between 0 and 1 (the fraction of the cache "
            "removed; 0 is full KV, which always runs)"
        )
    return float(ratio)


def parse_method(spec: str) -> Method:
    """``"snapkv"`` or ``"fastkv:tsp_layer=14,tsp_rate=0.2"`` (values parse as JSON) -> :class:`Method`."""
    from kvpolicy.cli import parse_overrides

    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ValueError(f"method {spec!r}: expected a preset name, e.g. snapkv or fastkv:tsp_rate=0.2")
    options: dict[str, Any] = {}
    if rest:
        pairs = [item.split("=", 1) for item in rest.split(",")]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ValueError(f"method {spec!r}: settings look like name:key=value,key=value")
        options = parse_overrides([f"--{k.strip()}={v}" for k, v in pairs])
    if "kv_budget" in options:
        raise ValueError(
            f"method {spec!r}: kv_budget is set by each compression ratio (kv_budget = 1 - ratio); "
            "pick ratios with --ratios"
        )
    if name == FULL:
        raise ValueError("fullkv always runs (the ceiling); list only compressing methods")
    return Method(name, options)


def takes_budget(preset: type) -> bool:
    """Whether a preset class has a ``kv_budget`` setting (what puts it on the ratio axis)."""
    return "kv_budget" in getattr(preset, "model_fields", {})


def compressing_presets() -> list[str]:
    """Every registered preset that takes ``kv_budget`` (fullkv aside), :data:`PREFERRED_ORDER` first,
    then the registry's order."""
    from kvpolicy.registry import get_registry

    presets = get_registry().presets
    names = [n for n, e in presets.items() if n != FULL and takes_budget(e.obj)]
    first = [n for n in PREFERRED_ORDER if n in names]
    return first + [n for n in names if n not in first]


def check_methods(methods: Sequence[Method], ratios: Sequence[float]) -> None:
    """Refuse an unknown preset, one without ``kv_budget``, or a bad setting, before the model loads."""
    from kvpolicy.registry import get_policy, get_registry

    presets = get_registry().presets
    for method in methods:
        if method.name in presets and not takes_budget(presets[method.name].obj):
            raise ValueError(
                f"method {method.name!r} has no kv_budget setting, so it has no place on the compression "
                "ratio axis; the leaderboard runs presets that take kv_budget (kvpolicy list NAME)"
            )
        for ratio in ratios:
            get_policy(method.name, **{**method.options, "kv_budget": budget_for(ratio)})


# -- results --------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One (method, ratio): its run folder, summary and whether every sample (every shard) is done."""

    method: str
    ratio: float | None  # None: full KV
    settings: str = ""  # resolved settings but kv_budget, e.g. "window=8 kernel=7 pooling=max"
    run_dir: Path | None = None
    key: str | None = None  # the whole run's key (shards share it)
    summary: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    total: int | None = None
    complete: bool = False
    error: str | None = None

    @property
    def score(self) -> float | None:
        value = self.summary.get("score")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


@dataclass
class LeaderboardResult:
    """What :func:`run_leaderboard` did: every cell, the table and plot files, and its settings."""

    out: Path
    cells: list[Cell]
    methods: list[str]
    ratios: list[float]
    tasks: list[str]
    length: int
    samples: int
    model: str
    table_path: Path
    json_path: Path
    plot_path: Path | None
    seconds: float

    def cell(self, method: str, ratio: float | None) -> Cell | None:
        return next((c for c in self.cells if c.method == method and c.ratio == ratio), None)


def default_out(model_name: str, length: int) -> Path:
    return Path("results/leaderboard") / f"{slug(model_name, 40)}-{length}"


def _is_embedded(model: Any) -> bool:
    from kvpolicy.calibrated import packaged_model_name
    from kvpolicy.models import EMBEDDED

    return packaged_model_name(model) == EMBEDDED.name


def run_leaderboard(
    model: Any = None,
    tokenizer: Any = None,
    *,
    methods: Sequence[str | Method] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    length: int | None = None,
    tasks: Sequence[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 42,
    out: str | Path | None = None,
    model_name: str | None = None,
    haystack_dir: str | Path | None = None,
    max_new_tokens: int | None = None,
    shard: str | tuple[int, int] | None = None,
    force: bool = False,
    quiet: bool = False,
    console: Any = None,
    command: Sequence[str] | None = None,
    batch_size: int = 1,
    compile: bool = False,
    graphs: bool = False,
    plot: bool = True,
) -> LeaderboardResult:
    """Run kvpress's leaderboard protocol: RULER, query-agnostic, every method at every ratio, plus full KV.

    ``methods`` are preset names or ``"name:key=value,..."`` specs (default: every registered preset
    with ``kv_budget``, :func:`compressing_presets`); ``ratios`` are compression ratios (fraction
    removed; ``kv_budget = 1 - ratio``). ``length`` and ``tasks`` default to the embedded model's
    :data:`EMBEDDED_LENGTH` / :data:`EMBEDDED_TASKS` on it, else 4096 and all 11 tasks. Runs go under
    ``out/ruler/`` (default ``results/leaderboard/<model>-<length>``); the table (``leaderboard.md``,
    ``leaderboard.json``) and plot (``leaderboard.png``) go in ``out``. A method whose run fails is
    reported in the table and the others go on. ``shard``, ``batch_size``, ``compile``, ``graphs``,
    ``force`` as in :func:`~kvpolicy.eval.runner.run_eval`.
    """
    from rich.console import Console

    from kvpolicy.eval import ruler
    from kvpolicy.eval.runner import EMBEDDED_LABEL, model_identity, run_eval
    from kvpolicy.eval.shard import parse_shard

    started = time.monotonic()
    if console is None:
        console = Console(quiet=quiet)
        if not console.is_terminal:
            console.width = 200
    ratio_list = sorted({check_ratio(r) for r in ratios})
    if not ratio_list:
        raise ValueError("--ratios: give at least one compression ratio")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples!r}")
    chosen = [m if isinstance(m, Method) else parse_method(m) for m in (methods or [])]
    unusable: list[Cell] = []
    if methods:
        check_methods(chosen, ratio_list)  # methods named by the user: a bad one is an error
    else:  # every registered one: a preset that cannot be built as is (no calibration yet) is reported
        for name in compressing_presets():
            try:
                check_methods([Method(name)], ratio_list)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                unusable += [
                    Cell(name, r, error=f"not built with its defaults: {reason}") for r in ratio_list
                ]
                console.print(f"leaderboard: left out {name}: {reason}", markup=False, highlight=False)
                continue
            chosen.append(Method(name))
    part = parse_shard(shard)
    if model is None:
        from kvpolicy.models import load_model

        model, tokenizer = load_model()
        model_name = model_name or EMBEDDED_LABEL
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    embedded = _is_embedded(model)
    if length is None:
        length = EMBEDDED_LENGTH if embedded else LEADERBOARD_LENGTH
    task_list = list(tasks) if tasks else list(EMBEDDED_TASKS if embedded else ruler.TASKS)
    name = model_identity(model, model_name)["name"]
    out_dir = Path(out) if out is not None else default_out(name, length)
    quiet_console = Console(quiet=True)

    def run(policy: str, options: dict[str, Any]) -> Any:
        return run_eval(
            "ruler",
            model,
            tokenizer,
            policy=policy,
            policy_options=options,
            out=out_dir,
            model_name=model_name,
            force=force,
            quiet=True,
            console=quiet_console,
            command=command,
            lengths=[length],
            samples=samples,
            tasks=task_list,
            seed=seed,
            haystack_dir=haystack_dir,
            query_agnostic=True,
            max_new_tokens=max_new_tokens,
            shard=part,
            batch_size=batch_size,
            compile=compile,
            graphs=graphs,
        )

    jobs: list[tuple[Method, float | None]] = [(Method(FULL), None)]
    jobs += [(m, r) for m in chosen for r in ratio_list]
    where = f", shard {part[0]}/{part[1]}" if part else ""
    console.print(
        f"leaderboard: {name}, RULER at {length} tokens, {len(task_list)} task(s) x {samples} sample(s), "
        f"query-agnostic; {len(chosen)} method(s) x {len(ratio_list)} ratio(s) + full KV{where} -> {out_dir}",
        markup=False,
    )
    cells: list[Cell] = []
    for i, (method, ratio) in enumerate(jobs, 1):
        options = dict(method.options)
        if ratio is not None:
            options["kv_budget"] = budget_for(ratio)
        cell = Cell(method.spec if method.name != FULL else FULL, ratio)
        cell.settings = _settings(method.name, options, model)
        t0 = time.monotonic()
        try:
            result = run(method.name, options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one method failing (a new preset, a missing calibration) stops no other
            cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            console.print(
                f"[{i}/{len(jobs)}] {cell.method} ratio {ratio}: [red]failed[/red]: {cell.error}",
                highlight=False,
            )
            cells.append(cell)
            continue
        meta = json.loads((result.run_dir / "run.json").read_text(encoding="utf-8"))
        cell.run_dir = result.run_dir
        cell.key = (meta.get("shard") or {}).get("whole_key") or meta.get("key")
        cells.append(cell)
        what = "done before" if result.status == "skipped" else f"{time.monotonic() - t0:.0f} s"
        score = result.summary.get("score")
        console.print(
            f"[{i}/{len(jobs)}] {cell.method} "
            + ("(full KV)" if ratio is None else f"ratio {ratio:g} (kv_budget {budget_for(ratio):g})")
            + f": {score:.1f} over {result.summary.get('n', 0)} sample(s), {what}",
            markup=False,
            highlight=False,
        )
    _fill_from_store(cells, out_dir)
    methods_done = [c.method for c in cells if c.ratio is None] + [m.spec for m in chosen]
    cells += unusable
    result = LeaderboardResult(
        out_dir,
        cells,
        methods_done,
        ratio_list,
        task_list,
        length,
        samples,
        name,
        out_dir / "leaderboard.md",
        out_dir / "leaderboard.json",
        None,
        time.monotonic() - started,
    )
    write_outputs(result, plot=plot, console=console)
    return result


def _settings(name: str, options: dict[str, Any], model: Any) -> str:
    """The preset's resolved settings for ``model`` (measured ones included), kv_budget left out."""
    from kvpolicy.calibrated import resolve_preset

    try:
        resolved = resolve_preset(name, options, model)
    except Exception:  # reported when the run itself fails
        return ""
    return " ".join(f"{k}={v}" for k, v in resolved.settings.items() if k != "kv_budget" and v is not None)


def _fill_from_store(cells: list[Cell], out: Path) -> None:
    """Each cell's summary from every run of its configuration in ``out`` (the shards merged), so a
    shard's table shows what all shards have finished so far."""
    root = out / "ruler"
    runs = report.load_runs([root]) if root.is_dir() else []
    by_key = {run.meta.get("key"): run for run in runs}
    for cell in cells:
        run = by_key.get(cell.key)
        if run is None:
            continue
        cell.summary = run.summary
        cell.samples = len(run.records)
        cell.total = run.total or None
        cell.complete = run.complete


# -- the table and the plot -------------------------------------------------------------------------
def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return ""
    if cell.error:
        return "error"
    score = cell.score
    if score is None:
        return "-"
    return f"{score:.1f}" + ("" if cell.complete else "*")


def table(result: LeaderboardResult) -> tuple[list[str], list[list[str]]]:
    """The leaderboard's shape: one row per method, one column per compression ratio (full KV at 0),
    each the average over tasks; ``*`` marks a cell not finished yet (a shard or an interrupted run)."""
    header = ["method", "0 (full KV)", *[f"{r:g}" for r in result.ratios]]
    full = result.cell(FULL, None)
    rows = [["full KV", _fmt(full), *[""] * len(result.ratios)]]
    for method in result.methods[1:]:
        rows.append([method, "", *[_fmt(result.cell(method, r)) for r in result.ratios]])
    return header, rows


def task_table(result: LeaderboardResult) -> tuple[list[str], list[list[str]]]:
    """Per task: one row per (method, ratio), one column per task, then the average."""
    header = ["method", "ratio", *result.tasks, "average"]
    rows = []
    for cell in result.cells:
        if cell.run_dir is None and cell.error:
            continue  # never ran (listed under the failures)
        by_task = cell.summary.get("by_task", {})
        scores = [f"{by_task[t]:.1f}" if t in by_task else "-" for t in result.tasks]
        ratio = "0" if cell.ratio is None else f"{cell.ratio:g}"
        rows.append(["full KV" if cell.ratio is None else cell.method, ratio, *scores, _fmt(cell)])
    return header, rows


def legend_label(cell: Cell) -> str:
    """The method and its resolved settings (kv_budget aside: it is the x-axis)."""
    name = "full KV" if cell.ratio is None else cell.method.split(":")[0]
    return f"{name} ({cell.settings})" if cell.settings else name


def write_outputs(result: LeaderboardResult, plot: bool = True, console: Any = None) -> None:
    """``leaderboard.md`` and ``leaderboard.json`` in ``result.out``, ``leaderboard.png`` when
    matplotlib is there; the tables printed to ``console``."""
    result.out.mkdir(parents=True, exist_ok=True)
    header, rows = table(result)
    theader, trows = task_table(result)
    counts = sorted({c.samples for c in result.cells if not c.error})
    title = (
        f"kvpress leaderboard protocol: {result.model}, RULER at {result.length} tokens, "
        f"query-agnostic, {len(result.tasks)} task(s) x {result.samples} sample(s) "
        f"(string_match_all, 0-100, average over tasks; columns: compression ratio = fraction of the "
        f"KV cache removed, kv_budget = 1 - ratio)"
    )
    unfinished = any(not c.complete and not c.error for c in result.cells)
    errors = [c for c in result.cells if c.error]
    lines = [f"# {title}", "", report.markdown_table(header, rows)]
    if unfinished:
        lines.append("`*`: not every sample has finished (a shard still running, or an interrupted run).\n")
    lines += ["## Per task", "", report.markdown_table(theader, trows)]
    lines += ["## Methods (resolved settings)", ""]
    seen: set[str] = set()
    for cell in result.cells:
        if cell.method not in seen:
            seen.add(cell.method)
            lines.append(f"- {legend_label(cell)}")
    if errors:
        lines += ["", "## Failed", ""]
        lines += [f"- {line}" for line in _failures(errors)]
    lines += [
        "",
        f"Samples per cell: {', '.join(map(str, counts)) or 'none'}; wall time {result.seconds:.0f} s.",
        "",
    ]
    result.table_path.write_text("\n".join(lines), encoding="utf-8")
    data = {
        "model": result.model,
        "length": result.length,
        "tasks": result.tasks,
        "samples": result.samples,
        "ratios": result.ratios,
        "seconds": round(result.seconds, 1),
        "cells": [
            {
                "method": c.method,
                "ratio": c.ratio,
                "kv_budget": None if c.ratio is None else budget_for(c.ratio),
                "settings": c.settings,
                "score": c.score,
                "by_task": c.summary.get("by_task", {}),
                "samples": c.samples,
                "total": c.total,
                "complete": c.complete,
                "error": c.error,
                "run_dir": _relative(c.run_dir, result.out),
            }
            for c in result.cells
        ],
    }
    from kvpolicy.eval.store import write_json_atomic

    write_json_atomic(result.json_path, data)
    if plot:
        from kvpolicy.eval import plots

        if plots.have_matplotlib():
            result.plot_path = plots.leaderboard_plot(
                _series(result),
                result.out / "leaderboard.png",
                f"{result.model}: RULER {result.length} tokens, query-agnostic "
                f"({len(result.tasks)} tasks x {result.samples} samples)",
                ceiling=_ceiling(result),
            )
    if console is not None:
        console.print(report.rich_table(header, rows, title))
        console.print(report.rich_table(theader, trows, "per task"))
        for line in _failures(errors):
            console.print(f"failed: {line}", markup=False, highlight=False)
        console.print(f"table: {result.table_path}", markup=False)
        if result.plot_path:
            console.print(f"plot: {result.plot_path}", markup=False)


def _relative(path: Path | None, root: Path) -> str | None:
    """A run folder as a path under the leaderboard's folder (where the table file is), when it is one."""
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _failures(errors: Sequence[Cell]) -> list[str]:
    """One line per method and error, with the ratios it failed at."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for c in errors:
        grouped.setdefault((c.method, str(c.error)), []).append(
            "full KV" if c.ratio is None else f"{c.ratio:g}"
        )
    return [f"{method} at ratio {', '.join(ratios)}: {error}" for (method, error), ratios in grouped.items()]


def _series(result: LeaderboardResult) -> dict[str, dict[float, float]]:
    series: dict[str, dict[float, float]] = {}
    for method in result.methods[1:]:
        points = {
            c.ratio: score
            for c in result.cells
            if c.method == method and c.ratio is not None and (score := c.score) is not None
        }
        first = next((c for c in result.cells if c.method == method), None)
        if points and first is not None:
            series[legend_label(first)] = points
    return series


def _ceiling(result: LeaderboardResult) -> tuple[str, float] | None:
    full = result.cell(FULL, None)
    if full is None or full.score is None:
        return None
    return f"full KV: {full.score:.1f}", full.score
