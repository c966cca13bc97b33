"""``kvpolicy eval needle|ruler|longbench|compare|leaderboard``: accuracy of a policy on the three
benchmarks, one table (plus plots) across runs, and kvpress's leaderboard protocol in one command.

Policy settings are options as in ``kvpolicy generate`` (``--kv-budget 128 --tsp-rate 0.2``), or
``--policy-config FILE``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpolicy.eval.tasks import DEFAULT_LENGTHS


def add_parser(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from kvpolicy.cli import SUBCOMMANDS

    p = sub.add_parser(
        "eval",
        help=SUBCOMMANDS["eval"][1],
        description=(
            "Evaluate a policy. Runs are keyed by their full configuration, resume after an interruption "
            "and are skipped once finished (--force reruns). Preset settings are options: --kv-budget 128."
        ),
    )
    esub = p.add_subparsers(
        dest="eval_command", required=True, metavar="{needle,ruler,longbench,compare,leaderboard}"
    )

    needle = _bench_parser(esub, "needle", "needle-in-a-haystack: recall of the needle per length and depth")
    needle.add_argument(
        "--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths in tokens"
    )
    needle.add_argument("--depths", type=int, default=10, help="needle depths from 0 to 100%% (default 10)")
    needle.add_argument(
        "--samples", type=int, default=1, help="haystacks per cell (sample i starts at the i-th essay)"
    )
    needle.add_argument(
        "--haystack-dir", type=Path, help="folder of .txt files (default: Paul Graham essays)"
    )
    needle.add_argument(
        "--completion",
        action="store_true",
        help="completion-style prompt for base models (no chat template; the model continues the answer)",
    )
    needle.add_argument(
        "--query-agnostic",
        action="store_true",
        help="compress the document without the question, then answer from that cache (kvpress's protocol)",
    )
    model_args(needle)

    ruler = _bench_parser(esub, "ruler", "RULER synthetic tasks, generated on the fly (seeded)")
    ruler.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="prompt lengths")
    ruler.add_argument("--tasks", nargs="+", help="subset of tasks (default: all 11)")
    ruler.add_argument("--samples", type=int, default=5, help="samples per task and length (default 5)")
    ruler.add_argument("--seed", type=int, default=42)
    ruler.add_argument(
        "--haystack-dir", type=Path, help="essay haystack folder (default: Paul Graham essays)"
    )
    ruler.add_argument(
        "--query-agnostic",
        action="store_true",
        help="compress each task's context without its question, then answer from that cache (kvpress's protocol)",
    )
    model_args(ruler)

    lb = _bench_parser(esub, "longbench", "LongBench v1 English tasks from the official jsonl files")
    lb.add_argument(
        "--data-dir",
        type=Path,
        help="folder of official LongBench <task>.jsonl files (default: $KVPOLICY_LONGBENCH_DIR)",
    )
    lb.add_argument("--tasks", nargs="+", help="subset of tasks (default: every task with a file)")
    lb.add_argument("--samples", type=int, help="first N records per task (default: all)")
    lb.add_argument("--longbench-e", action="store_true", help="read <task>_e.jsonl (LongBench-E)")
    lb.add_argument(
        "--max-length",
        type=int,
        help="prompt token budget before middle truncation (default: model window - max new tokens)",
    )
    lb.add_argument(
        "--max-prompt-tokens", type=int, help="leave out records whose untruncated prompt is longer than this"
    )
    lb.add_argument("--strict", action="store_true", help="a malformed data line is an error, not skipped")
    model_args(lb)

    cmp_ = esub.add_parser(
        "compare",
        help="one table across runs, plus plots",
        description="Compare runs: DIRs are run folders or folders holding them (e.g. results/eval).",
    )
    cmp_.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    cmp_.add_argument("--out", type=Path, help="where compare.md and the plots go (default: DIR/compare)")
    cmp_.set_defaults(func=run_compare)
    _leaderboard_parser(esub, model_args)


def _leaderboard_parser(esub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from kvpolicy.eval import leaderboard as lb

    text = (
        "kvpress's leaderboard protocol in one command: RULER with the context compressed before the "
        "question is seen (query-agnostic), every method at every compression ratio (the fraction of "
        "the KV cache removed; each preset runs with kv_budget = 1 - ratio), greedy answers, RULER's "
        "string_match_all, plus full KV as the ceiling. Prints the table (method x ratio, the average "
        "over tasks, then per task) and writes leaderboard.md/.json/.png in --out. Every cell is a "
        "resumable query-agnostic RULER run under OUT/ruler (--shard splits them; rerun the same "
        "command to resume or to add methods registered since). "
        f"Length: {lb.LEADERBOARD_LENGTH} tokens as the leaderboard, except on the embedded "
        f"SmolLM2-135M-Instruct (the default model): {lb.EMBEDDED_LENGTH} tokens and its "
        f"{len(lb.EMBEDDED_TASKS)} tasks {', '.join(lb.EMBEDDED_TASKS)}: where that model still "
        "answers with full KV (measured at 512, 1K and 2K, docs/results.md; a task it fails uncompressed "
        "cannot tell methods apart), at the length where every registered method at five ratios fits in "
        "about half an hour of one CPU thread (--length 1024 or 2048: longer, and it still answers). "
        "With Llama-3.1-8B-Instruct or Qwen3-8B on a GPU it is the same command at 4K over all 11 tasks."
    )
    q = esub.add_parser(
        "leaderboard",
        help="kvpress's leaderboard protocol: RULER, query-agnostic, methods x compression ratios, table and plot",
        description=text,
        allow_abbrev=False,
    )
    q.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME[:key=value,...]",
        help="presets to compare, with settings as NAME:key=value,key=value (e.g. fastkv:tsp_layer=14); "
        "default: every registered preset that takes kv_budget (kvpolicy list)",
    )
    q.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=list(lb.DEFAULT_RATIOS),
        help="compression ratios, fractions of the KV cache REMOVED (kv_budget = 1 - ratio)",
    )
    q.add_argument(
        "--length",
        type=int,
        help=f"prompt length in tokens (default: {lb.LEADERBOARD_LENGTH}; {lb.EMBEDDED_LENGTH} on the embedded model)",
    )
    q.add_argument(
        "--tasks", nargs="+", help="RULER tasks (default: all 11; on the embedded model the 6 it answers)"
    )
    q.add_argument("--samples", type=int, default=lb.DEFAULT_SAMPLES, help="samples per task and ratio")
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--haystack-dir", type=Path, help="essay haystack folder (default: Paul Graham essays)")
    q.add_argument("--out", type=Path, help="results folder (default: results/leaderboard/<model>-<length>)")
    q.add_argument("--force", action="store_true", help="rerun cells that already finished")
    q.add_argument("--max-new-tokens", type=int, help="cap on new tokens (default: RULER's, at most 64)")
    q.add_argument("--no-plot", action="store_true", help="write no leaderboard.png")
    q.add_argument("--quiet", action="store_true", help="no progress lines or tables")
    q.add_argument(
        "--compile", action="store_true", help="compile the decode step (same answers; faster on a GPU)"
    )
    q.add_argument(
        "--graphs",
        action="store_true",
        help="replay the decode step from recorded CUDA graphs (same answers; the fast path on a GPU)",
    )
    q.add_argument(
        "--shard",
        help="run shard i of n (0-based, e.g. 0/4) of every cell; 'env' reads RANK/WORLD_SIZE or a Slurm "
        "array; each shard's table shows what all shards have finished",
    )
    model_args(q)
    q.set_defaults(func=run_leaderboard_cmd)


def run_leaderboard_cmd(args: argparse.Namespace) -> int:
    from kvpolicy.cli import check_model_source, load_from_args
    from kvpolicy.eval import leaderboard as lb
    from kvpolicy.eval.runner import EMBEDDED_LABEL
    from kvpolicy.eval.shard import local_device, parse_shard

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Methods, ratios and the shard are checked before the model loads: a typo should not cost a load.
    methods = [lb.parse_method(spec) for spec in args.methods or []]
    ratios = [lb.check_ratio(r) for r in args.ratios]
    lb.check_methods(methods, ratios)
    shard = parse_shard(args.shard)
    check_model_source(args)
    if shard and args.device is None:
        args.device = local_device()
    model, tokenizer = load_from_args(args)
    name = args.model or EMBEDDED_LABEL
    if args.gguf_file:
        name = f"{name}/{args.gguf_file}"
    lb.run_leaderboard(
        model,
        tokenizer,
        methods=methods or None,
        ratios=ratios,
        length=args.length,
        tasks=args.tasks,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        model_name=name,
        haystack_dir=args.haystack_dir,
        max_new_tokens=args.max_new_tokens,
        shard=shard,
        force=args.force,
        quiet=args.quiet,
        command=_command_line(),
        compile=args.compile,
        graphs=args.graphs,
        plot=not args.no_plot,
    )
    return 0


def _bench_parser(esub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: a policy option (e.g. --depth) must never be taken for a prefix of ours.
    q = esub.add_parser(
        name, help=help_, description=help_ + ". Policy settings are options.", allow_abbrev=False
    )
    q.add_argument("--policy", default="fullkv", help="preset name (see `kvpolicy list`)")
    q.add_argument("--policy-config", type=Path, help="JSON policy config (overrides --policy)")
    q.add_argument("--label", help="name of the run in tables (default: policy and its options)")
    q.add_argument(
        "--out", type=Path, default=Path("results/eval"), help="results folder (default results/eval)"
    )
    q.add_argument("--force", action="store_true", help="rerun even if this configuration already finished")
    q.add_argument("--max-new-tokens", type=int, help="cap on new tokens (default: the benchmark's own)")
    q.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    q.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="samples generated at once, left-padded (default 1; same answers, faster on a GPU)",
    )
    q.add_argument(
        "--compile", action="store_true", help="compile the decode step (same answers; faster on a GPU)"
    )
    q.add_argument(
        "--graphs",
        action="store_true",
        help="replay the decode step from recorded CUDA graphs (same answers; the fast path on a GPU)",
    )
    q.add_argument(
        "--shard",
        help="run shard i of n (0-based, e.g. 0/4) in its own folder; 'env' reads RANK/WORLD_SIZE or a "
        "Slurm array; compare merges the shards",
    )
    q.set_defaults(func=run_benchmark, accepts_policy_options=True)
    return q


def run_benchmark(args: argparse.Namespace) -> int:
    from kvpolicy.calibrated import resolve_policy
    from kvpolicy.cli import load_from_args, parse_overrides
    from kvpolicy.eval.runner import EMBEDDED_LABEL, run_eval
    from kvpolicy.eval.shard import local_device, parse_shard

    options = parse_overrides(getattr(args, "policy_options", []))
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Validate the policy and the shard before loading the model: a typo should not cost a model load
    # (the model's measured settings are applied once it is loaded).
    resolve_policy(args.policy, options, args.policy_config)
    shard = parse_shard(args.shard)
    if shard and args.device is None:
        args.device = local_device()  # one process per GPU under torchrun / accelerate launch
    model, tokenizer = load_from_args(args)
    name = args.model or EMBEDDED_LABEL
    if args.gguf_file:
        name = f"{name}/{args.gguf_file}"
    bench = args.eval_command
    extra: dict[str, Any] = {}
    for opt in ("lengths", "depths", "samples", "tasks", "seed", "haystack_dir", "data_dir", "max_length"):
        if hasattr(args, opt):
            extra[opt] = getattr(args, opt)
    for flag in ("longbench_e", "strict", "completion", "query_agnostic"):
        if getattr(args, flag, False):
            extra[flag] = True
    if getattr(args, "max_prompt_tokens", None) is not None:
        extra["max_prompt_tokens"] = args.max_prompt_tokens
    run_eval(
        bench,
        model,
        tokenizer,
        policy=args.policy,
        policy_options=options,
        policy_config=args.policy_config,
        out=args.out,
        label=args.label,
        model_name=name,
        force=args.force,
        quiet=args.quiet,
        command=_command_line(),
        max_new_tokens=args.max_new_tokens,
        shard=shard,
        batch_size=args.batch_size,
        compile=args.compile,
        graphs=args.graphs,
        **extra,
    )
    return 0


def _command_line() -> list[str] | None:
    """The command as typed, when this process is the ``kvpolicy`` command (not a test calling main)."""
    if Path(sys.argv[0]).name in ("kvpolicy", "cli.py", "__main__.py"):
        return ["kvpolicy", *sys.argv[1:]]
    return None


def run_compare(args: argparse.Namespace) -> int:
    from kvpolicy.eval.report import compare

    out = args.out or (args.dirs[0] / "compare")
    compare(args.dirs, out)
    return 0
