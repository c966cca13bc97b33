"""``kvpolicy eval needle|ruler|longbench|compare``: accuracy of a policy on the three benchmarks, and
one table (plus plots) across runs.

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
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="{needle,ruler,longbench,compare}")

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
