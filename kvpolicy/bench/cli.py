"""``kvpolicy bench prefill|e2e``: latency and memory per policy and length, with ratios to full KV
measured in the same run and the cost model's bound beside them, and absolute figures against the
machine's own limits (read bandwidth, matmul peak) measured at the start of the run.
``bench e2e --throughput``: tokens/s of whole decode batches up to the largest that fits
(:mod:`kvpolicy.bench.throughput`).

With ``--random-weights`` nothing is loaded but the model's shape: prompts are seeded random token
ids, never text, so the bench starts on a machine with no network (no tokenizer, no embedded model)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kvpolicy import threads
from kvpolicy.bench import kernel as kernel_report
from kvpolicy.bench import throughput as tp
from kvpolicy.bench.machine import Machine, measure_machine
from kvpolicy.bench.runner import (
    EAGER,
    FULL,
    Row,
    Sample,
    benchmark,
    is_reference,
    machine_description,
    rows_to_json,
    warm_steps,
)
from kvpolicy.interfaces import Policy

#: Model shapes benchmarkable without weights (nothing can be downloaded on benchmark machines).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
    },
}


def add_parser(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from kvpolicy.cli import SUBCOMMANDS

    p = sub.add_parser(
        "bench",
        help=SUBCOMMANDS["bench"][1],
        description=(
            "Benchmark policies against full KV in one interleaved run. --policy takes NAME or "
            "NAME:key=value,key=value and may repeat; extra --key value options apply to every policy."
        ),
    )
    p.add_argument(
        "mode",
        choices=["prefill", "e2e", "kernel"],
        help=(
            "prefill only, prefill plus --gen decode steps, or 'kernel': the decode kernels compiled for "
            "a GPU (--shape, --gpu) and read from their machine code, no GPU needed"
        ),
    )
    p.add_argument(
        "--policy", action="append", default=[], help="preset (repeatable), e.g. fastkv:tsp_rate=0.2"
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", help="prompt lengths in tokens (default 4096; kernel: 8192 131072)"
    )
    p.add_argument("--gen", type=int, default=256, help="decode steps in e2e mode (default 256)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--batch-size", type=int, default=1, help="prompts per batch (the prompt repeated; default 1)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile kvpolicy's decode step (torch.compile; with --graphs the compiled step is recorded)",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="decode through kvpolicy's graph-replayed step (generate(graphs=True); CUDA graphs on CUDA)",
    )
    p.add_argument(
        "--also-eager",
        action="store_true",
        help=(
            "with --compile or --graphs: also time the eager decode step from the same prefill (a copy "
            "of its cache), as 'NAME (eager)' rows beside the fast ones, without a second prefill"
        ),
    )
    p.add_argument(
        "--compile-backend",
        metavar="NAME",
        help="torch.compile backend for --compile (default inductor; 'eager' checks capture in seconds)",
    )
    p.add_argument(
        "--random-weights",
        metavar="CONFIG",
        help=(
            f"a config.json path or one of {', '.join(SHAPES)}: random weights, prompts of random token "
            "ids (no tokenizer, no download)"
        ),
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random prompts with --random-weights (default 0)"
    )
    p.add_argument(
        "--throughput",
        action="store_true",
        help=(
            "e2e only: generated tokens/s of whole decode batches at --batch-sizes, 'max' being the "
            "largest batch that fits in memory (cost model, then confirmed by running it)"
        ),
    )
    p.add_argument(
        "--batch-sizes",
        metavar="LIST",
        help="with --throughput: comma-separated batch sizes and 'max' (default 1,8,32,max)",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        help=(
            "with --throughput: memory the run may use, weights included (default: free device memory "
            "plus the weights on CUDA, available RAM plus the weights on a CPU)"
        ),
    )
    p.add_argument(
        "--prefill-batch",
        type=int,
        metavar="N",
        help=(
            "with --throughput: prefill every sequence, N at a time, and decode them as one batch "
            "(default: every sequence's cache is a copy of one prefill of the prompt)"
        ),
    )
    p.add_argument(
        "--no-transformers-baseline", action="store_true", help="skip plain transformers + DynamicCache"
    )
    p.add_argument(
        "--transformers-compiled",
        action="store_true",
        help=(
            "also run plain transformers with StaticCache and torch.compile of the decode forward "
            "(its recommended fast path; off by default: compiling takes minutes on a CPU, and the "
            "warm-up repeats pay for it)"
        ),
    )
    p.add_argument(
        "--out", type=Path, help="write results as JSON here (a PNG plot and a Markdown table go beside it)"
    )
    kernel_report.add_arguments(p)
    model_args(p)
    p.set_defaults(func=run, accepts_policy_options=True)


def random_model(spec: str, dtype: torch.dtype, device: str | None) -> Any:
    """A randomly initialised model of a known shape or a config.json, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec in SHAPES:
        data = dict(SHAPES[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"--random-weights {spec!r} is neither a known shape ({', '.join(SHAPES)}) nor a file"
            )
        data = json.loads(path.read_text())
    model_type = data.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **data)
    config._attn_implementation = "sdpa"
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parse_policy_spec(spec: str, common: dict[str, Any], model: Any = None) -> tuple[str, Policy]:
    """``"fastkv:tsp_rate=0.2,kv_budget=0.1"`` -> (label, policy); ``common`` overrides apply too.
    With ``model``, settings measured for that (packaged) model fill the rest and a line says so,
    with every resolved setting (:func:`kvpolicy.calibrated.resolve_preset`)."""
    from kvpolicy.calibrated import resolve_preset
    from kvpolicy.cli import parse_overrides

    name, _, rest = spec.partition(":")
    overrides = dict(common)
    if rest:
        pairs = [item.split("=", 1) for item in rest.split(",")]
        bad = [p for p in pairs if len(p) != 2]
        if bad:
            raise ValueError(f"bad policy spec {spec!r}: settings look like name:key=value,key=value")
        overrides.update(parse_overrides([f"--{k}={v}" for k, v in pairs]))
    resolved = resolve_preset(name, overrides, model)
    if model is not None:
        print(f"{spec}: {resolved.label}" + (f" (note: {resolved.note})" if resolved.note else ""))
    return spec, resolved.policy


def _inputs(tokenizer: Any, model: Any, lengths: list[int], batch_size: int = 1) -> dict[int, torch.Tensor]:
    from kvpolicy.eval import needle

    haystack = needle.load_haystack(needle.find_haystack_dir())
    device = model.get_input_embeddings().weight.device
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    # A batch repeats the prompt: same length, so the transformers baseline needs no padding either.
    return {
        length: torch.tensor(
            [needle.build_sample(tokenizer, length, 0.5, haystack).input_ids] * batch_size, device=device
        )
        for length in lengths
    }


def random_inputs(
    model: Any, lengths: list[int], batch_size: int = 1, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Seeded random token ids in ``[0, vocab_size)``, one prompt per length repeated ``batch_size``
    times: a random-weight model gives text no meaning, and with no tokenizer to load the bench starts
    on a machine without network."""
    device = model.get_input_embeddings().weight.device
    vocab = int(model.config.vocab_size)
    out = {}
    for length in lengths:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        out[length] = ids.repeat(batch_size, 1).to(device)
    return out


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad or contradictory options, naming the value (before any model is built)."""
    if args.repeats < 1 or args.warmup < 0 or any(n < 16 for n in args.lengths):
        raise ValueError("--repeats must be >= 1, --warmup >= 0 and every length >= 16")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mode == "e2e" and args.gen < 1:
        raise ValueError(f"--gen must be >= 1 in e2e mode, got {args.gen}")
    if args.also_eager and not (args.compile or args.graphs):
        raise ValueError("--also-eager adds eager rows beside a fast decode path: give --compile or --graphs")
    if args.compile_backend is not None:
        known = torch.compiler.list_backends(exclude_tags=())
        if args.compile_backend not in known:
            raise ValueError(f"--compile-backend {args.compile_backend!r} is not one of {', '.join(known)}")
    warm = warm_steps(args.compile, args.graphs)
    if args.mode == "e2e" and args.gen <= warm:
        raise ValueError(
            f"--gen must be > {warm}, the untimed warm steps of this decode path, got {args.gen}"
        )
    for name in ("batch_sizes", "memory_gib", "prefill_batch"):
        if getattr(args, name) is not None and not args.throughput:
            raise ValueError(f"--{name.replace('_', '-')} needs --throughput")
    if not args.throughput:
        return
    if args.mode != "e2e":
        raise ValueError("--throughput times decoding: use `kvpolicy bench e2e --throughput`")
    if args.batch_size != 1:
        raise ValueError("--throughput takes its batch sizes from --batch-sizes, not --batch-size")
    if args.also_eager:
        raise ValueError("--also-eager is for latency runs; run --throughput once per decode path")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise ValueError(f"--memory-gib must be > 0, got {args.memory_gib}")
    if args.prefill_batch is not None and args.prefill_batch < 1:
        raise ValueError(f"--prefill-batch must be >= 1, got {args.prefill_batch}")


def run(args: argparse.Namespace) -> int:
    from kvpolicy import generation
    from kvpolicy.cli import load_from_args, parse_overrides

    if args.mode == "kernel":
        return kernel_report.run(args)
    args.lengths = args.lengths or [4096]
    threads.set_threads(args.threads)  # before any model is built (random weights skip load_from_args)
    common = parse_overrides(getattr(args, "policy_options", []))
    if getattr(args, "kv_bits", None):  # prefill and e2e: every policy's storage (kernel mode: the variants)
        if len(args.kv_bits) > 1:
            raise ValueError(
                f"--kv-bits is given {len(args.kv_bits)} times; outside kernel mode it sets every policy's "
                f"storage once: compare widths as --policy snapkv:kv_bits=4 --policy snapkv:kv_bits=16"
            )
        common["kv_bits"] = parse_overrides(["--kv-bits", args.kv_bits[0]])["kv_bits"]
    specs = args.policy or ["fastkv"]
    policies = dict(parse_policy_spec(spec, common) for spec in specs)
    _check_args(args)
    batch_sizes = tp.parse_batch_sizes(args.batch_sizes or "1,8,32,max") if args.throughput else []
    batch = 1 if args.throughput else args.batch_size
    if args.random_weights:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
        if dtype is None:
            raise ValueError(f"unknown --dtype {args.dtype!r}; use fp32, bf16 or fp16")
        model = random_model(args.random_weights, dtype, args.device)
        inputs = random_inputs(model, args.lengths, batch, args.seed)  # no tokenizer: works offline
    else:
        model, tokenizer = load_from_args(args)
        inputs = _inputs(tokenizer, model, args.lengths, batch)
    policies = dict(parse_policy_spec(spec, common, model) for spec in specs)  # resolved for the model
    backend = generation.COMPILE_BACKEND
    if args.compile_backend:
        generation.COMPILE_BACKEND = None if args.compile_backend == "inductor" else args.compile_backend
    try:
        return _run(args, model, inputs, policies, batch_sizes, batch)
    finally:
        generation.COMPILE_BACKEND = backend  # a process-wide setting: only for this run


def _run(
    args: argparse.Namespace,
    model: Any,
    inputs: dict[int, torch.Tensor],
    policies: dict[str, Policy],
    batch_sizes: list[int | str],
    batch: int,
) -> int:
    from rich.console import Console

    from kvpolicy.progress import track

    gen = args.gen if args.mode == "e2e" else 0
    console = Console()
    if not console.is_terminal:
        console.width = 200
    device = model.get_input_embeddings().weight.device
    with console.status("measuring the machine (read bandwidth, matmul peak, GEMV)"):
        machine = measure_machine(device, next(model.parameters()).dtype)
    print_machine(console, machine)
    record: dict[str, Any] = {
        "mode": args.mode,
        "model": args.random_weights or args.model or "SmolLM2-135M-Instruct (embedded)",
        "inputs": "random token ids" if args.random_weights else "text (needle haystack)",
        "dtype": str(next(model.parameters()).dtype),
        "gen": gen,
        "batch_size": batch,
        "decode": "graphs" if args.graphs else "compiled" if args.compile else "eager",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": {**machine_description(device), "measured": asdict(machine)},
    }
    if args.throughput:
        return _run_throughput(args, model, inputs, policies, batch_sizes, machine, console, record)
    n_variants = (
        len(policies) + 1 + (0 if args.no_transformers_baseline else 1) + int(args.transformers_compiled)
    )
    done: list[Row] = []

    def sample_line(length: int, variant: str, rep: int, s: Sample) -> None:
        label = "warm-up" if rep < 0 else f"repeat {rep + 1}"
        decode = f", decode {1000 * s.decode_s_per_token:.2f} ms/token" if s.decode_s_per_token else ""
        if s.warm_s:
            decode += f" (untimed warm steps {s.warm_s:.2f} s)"
        if s.graphs:
            decode += f"; {s.graphs}"
        console.print(f"  {length} {variant} {label}: prefill {s.prefill_s:.3f} s{decode}")

    def length_done(length: int, rows: list[Row]) -> None:
        done.extend(rows)
        for r in rows:
            console.print(f"  {length} {r.variant}: " + _row_line(r, gen))
        if args.out:
            _write(args.out, {**record, "results": rows_to_json(done)}, markdown_table(done, gen))

    with track(
        "benchmark", len(inputs) * (args.warmup + args.repeats) * n_variants, console=console
    ) as progress:
        rows = benchmark(
            model,
            inputs,
            policies,
            gen=gen,
            repeats=args.repeats,
            warmup=args.warmup,
            include_transformers=not args.no_transformers_baseline,
            include_transformers_compiled=args.transformers_compiled,
            compile=args.compile,
            progress=progress.advance,
            machine=machine,
            graphs=args.graphs,
            also_eager=args.also_eager,
            on_sample=sample_line,
            on_length=length_done,
        )
    print_rows(console, rows, gen)
    record["cpu"] = asdict(threads.report(console))
    if args.out:
        _write(args.out, {**record, "results": rows_to_json(rows)}, markdown_table(rows, gen))
        plot = plot_speedups(rows, args.out.with_suffix(".png"))
        console.print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0


def _run_throughput(
    args: argparse.Namespace,
    model: Any,
    inputs: dict[int, torch.Tensor],
    policies: dict[str, Policy],
    batch_sizes: list[int | str],
    machine: Machine,
    console: Any,
    record: dict[str, Any],
) -> int:
    """``bench e2e --throughput``: every cell printed as it is measured, the JSON rewritten after
    every length (a run cut short keeps what it measured), one summary table at the end."""
    from kvpolicy.progress import track

    done: list[tp.Cell] = []
    record = {**record, "throughput": True, "batch_sizes": batch_sizes, "memory_gib": args.memory_gib}
    record["prefill"] = (
        "copies of one prefill" if args.prefill_batch is None else f"{args.prefill_batch} at a time"
    )

    def length_done(length: int, cells: list[tp.Cell]) -> None:
        done.extend(cells)
        for c in cells:
            if c.requested == tp.MAX and c.vs_full_max is not None:
                bound = f" (bound {c.vs_full_max_bound:.2f}x)" if c.vs_full_max_bound else ""
                console.print(
                    f"  {length} {c.variant}: {c.batch} sequences, "
                    f"{c.tokens_per_s['median'] if c.tokens_per_s else float('nan'):.4g} tokens/s, "
                    f"{c.vs_full_max:.2f}x full KV's tokens/s at its largest batch{bound}"
                )
        if args.out:
            _write(args.out, {**record, "results": tp.cells_to_json(done)}, tp.markdown(done, batch_sizes))

    n_variants = len(policies) + (0 if FULL in policies else 1)
    total = len(inputs) * (args.warmup + args.repeats) * n_variants * len(batch_sizes)
    with track("throughput", total, console=console) as progress:
        cells = tp.throughput(
            model,
            inputs,
            policies,
            batch_sizes,
            args.gen,
            repeats=args.repeats,
            warmup=args.warmup,
            memory_gib=args.memory_gib,
            compile=args.compile,
            graphs=args.graphs,
            prefill_batch=args.prefill_batch,
            machine=machine,
            progress=progress.advance,
            say=lambda text: console.print("  " + text),
            on_length=length_done,
        )
    print_throughput(console, cells, batch_sizes)
    record["cpu"] = asdict(threads.report(console))
    if args.out:
        _write(args.out, {**record, "results": tp.cells_to_json(cells)}, tp.markdown(cells, batch_sizes))
        console.print(f"wrote {args.out}")
    return 0


def _write(out: Path, record: dict[str, Any], table: str) -> None:
    """The JSON and its Markdown table, rewritten as results come in; each replaced whole (written
    beside, then renamed), so a run killed mid-write (a stage's timeout) leaves the previous version."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(record, indent=2)), (out.with_suffix(".md"), table)):
        part = path.with_name(path.name + ".part")
        part.write_text(text)
        part.replace(path)


def _row_line(r: Row, gen: int) -> str:
    """One row's figures in a line, printed as soon as its length is done."""
    text = f"prefill {r.prefill_s['median']:.3f} s ({_md_ratio(r, 'prefill')})"
    if gen and r.decode_ms_per_token:
        text += f", decode {r.decode_ms_per_token['median']:.2f} ms/token ({_md_ratio(r, 'decode')})"
        text += f", bound {_decode_bound(r)}"
    text += f", KV {r.kv_bytes / 2**20:.1f} MiB"
    return text + (f"; {r.graphs}" if r.graphs else "")


def print_throughput(console: Any, cells: list[tp.Cell], batch_sizes: list[int | str]) -> None:
    from rich.table import Table

    head, rows = tp.summary_rows(cells, batch_sizes)
    table = Table(title="throughput: generated tokens/s of the whole batch (share of the bytes bound)")
    for col in head:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        "fit: the cost model's largest batch (weights + paged KV per sequence incl. reserve and page "
        "slack + workspace + prefill allowance, against the memory budget); '-': does not fit; the "
        "bound is the cost model's decode bytes at the measured read bandwidth. Last column: tokens/s "
        "at each one's largest batch over full KV's at its largest."
    )


def print_machine(console: Any, machine: Machine) -> None:
    console.print(
        f"machine ({machine.device}, {machine.dtype}): streaming read "
        f"{machine.read_bytes_per_s / 1e9:.1f} GB/s, matmul {machine.matmul_flops_per_s / 1e12:.3f} "
        f"TFLOP/s (n={machine.matmul_size}), GEMV {machine.gemv_bytes_per_s / 1e9:.1f} GB/s "
        f"(measured in {machine.seconds:.1f} s)"
    )


def print_rows(console: Any, rows: list[Row], gen: int) -> None:
    from rich.table import Table

    table = Table(
        title="latency vs full KV (median \\[p25-p75]; speed-up measured, share of the cost-model bound)"
    )
    cols = ["variant", "length", "prefill s", "prefill speed-up"]
    if gen:
        cols += ["decode ms/tok", "decode speed-up", "e2e s"]
    cols += ["KV MiB", "peak MiB*", "peak bound MiB", "prefill TFLOP/s (of peak)"]
    if gen:
        cols += ["decode bound ms (reached)"]
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        cells = [r.variant, str(r.length), _fmt(r.prefill_s, "{:.3f}"), _ratio(r, "prefill")]
        if gen:
            cells += [_fmt(r.decode_ms_per_token, "{:.1f}"), _ratio(r, "decode"), _fmt(r.e2e_s, "{:.2f}")]
        cells += [f"{r.kv_bytes / 2**20:.1f}", "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"]
        cells += [_mib(r.peak_bound_bytes), _tflops(r)]
        if gen:
            cells += [_decode_bound(r)]
        table.add_row(*cells)
    console.print(table)
    console.print(
        "* peak memory: CUDA allocator peak above the model on a GPU; on a CPU, growth of the process's "
        "peak RSS during the run (coarse: the allocator reuses freed memory). Its bound is the least a "
        "prefill must hold, without the weights (costmodel.prefill_peak_bytes). TFLOP/s: cost-model "
        "prefill FLOPs per measured second, share of the measured matmul peak. Decode bound: the cost "
        "model's bytes per step at the measured streaming read bandwidth, share of it reached."
    )


def markdown_table(rows: list[Row], gen: int) -> str:
    """The results as a Markdown table (for docs/performance.md)."""
    head = ["variant", "length", "prefill s", "prefill speed-up (bound)"]
    if gen:
        head += ["decode ms/token", "decode speed-up (bound)", "e2e s"]
    head += ["KV MiB"]
    # Absolute figures against the machine measured in the same run (after the ratio columns).
    head += ["prefill TFLOP/s (of peak)"]
    if gen:
        head += ["decode bound ms (reached)"]
    head += ["peak MiB (bound)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r.variant}`", str(r.length), f"{r.prefill_s['median']:.3f}", _md_ratio(r, "prefill")]
        if gen:
            decode = r.decode_ms_per_token["median"] if r.decode_ms_per_token else float("nan")
            e2e = r.e2e_s["median"] if r.e2e_s else float("nan")
            cells += [f"{decode:.1f}", _md_ratio(r, "decode"), f"{e2e:.2f}"]
        cells += [f"{r.kv_bytes / 2**20:.1f}", _tflops(r)]
        if gen:
            cells += [_decode_bound(r)]
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        cells += [f"{peak} ({_mib(r.peak_bound_bytes)})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _tflops(row: Row) -> str:
    """Prefill TFLOP/s reached and its share of the measured matmul peak: ``0.051 (68%)``."""
    if row.prefill_tflops is None:
        return "-"
    share = f" ({row.prefill_flops_share:.0%})" if row.prefill_flops_share is not None else ""
    return f"{row.prefill_tflops:.3g}{share}"


def _decode_bound(row: Row) -> str:
    """Decode bound in ms per token and the share of it the measurement reached: ``12.3 (45%)``."""
    if row.decode_bound_ms is None:
        return "-"
    share = f" ({row.decode_bound_share:.0%})" if row.decode_bound_share is not None else ""
    return f"{row.decode_bound_ms:.2f}{share}"


def _md_ratio(row: Row, key: str) -> str:
    measured = row.speedup.get(key)
    if measured is None:
        return "-"
    bound = row.bound.get(key)
    if is_reference(row.variant) or not bound:
        return f"{measured:.2f}x"
    return f"{measured:.2f}x ({bound:.2f}x, {measured / bound:.0%})"


def _fmt(stats: dict[str, float] | None, pattern: str) -> str:
    if not stats:
        return "-"
    return (
        f"{pattern.format(stats['median'])} [{pattern.format(stats['p25'])}-{pattern.format(stats['p75'])}]"
    )


def _ratio(row: Row, key: str) -> str:
    measured = row.speedup.get(key)
    if measured is None:
        return "-"
    if is_reference(row.variant):
        return f"{measured:.2f}x"
    bound = row.bound.get(key)
    share = f" ({measured / bound:.0%} of bound {bound:.2f}x)" if bound else ""
    return f"{measured:.2f}x{share}"


def plot_speedups(rows: list[Row], path: Path) -> Path | None:
    """Speed-up versus context length per policy (prefill, and decode when measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ["prefill"] + (["decode"] if any("decode" in r.speedup for r in rows) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for variant in dict.fromkeys(r.variant for r in rows):
            if variant in (FULL, FULL + EAGER):
                continue
            pts = [
                (r.length, r.speedup.get(key)) for r in rows if r.variant == variant and r.speedup.get(key)
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=variant)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{key} speed-up over full KV")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
