"""``kvpolicy bench kernel``: what the decode kernels would do on a GPU, read from their compiled code.

No GPU is needed. Triton compiles every kernel variant a decode step launches for a named card's
architecture (``triton.compile`` with a ``GPUTarget``); ``cuobjdump`` (shipped in Triton's nvidia backend)
gives each variant's registers, spills and machine code (SASS). From those:

* **programs per SM** (:func:`kvpolicy.kernels.paged_decode.occupancy`: registers, shared memory, warps)
  and the **splits** the kernel would launch with them (:func:`~kvpolicy.kernels.paged_decode.choose_splits`,
  the rule the CUDA path runs on the compiled kernel), so **waves** = programs / (SMs x programs per SM);
* the main loop's **SASS instructions per KV byte**: the loop body (the backward branch that holds the
  tile's dots) counted per warp, times warps, over the KV bytes one tile loads. An SM issues about four
  warp-instructions per cycle, so ``SMs x clock x 4 / (instructions per byte)`` is the **issue ceiling**:
  the most KV bytes per second the kernel can consume however fast memory is. It must sit well above the
  card's HBM bandwidth, or the kernel is bound by instruction issue (the previous kernel's broadcast
  products: ~0.9 instructions per byte, ~1.1 TB/s);
* the **merge**'s traffic and a latency estimate (its partials are written by the split kernel and read
  once; two dependent memory round trips).

Shapes the kernel does not serve (:func:`~kvpolicy.kernels.paged_decode.unserved`) are listed with the
rule that sends them to the torch path. Figures are estimates from compiled code, not timings.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.kernels import paged_decode as pd

if TYPE_CHECKING:
    from kvpolicy.storage import KVStorage

# -- cards and shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """A card: its architecture, SMs, boost clock, HBM bandwidth and per-SM limits (NVIDIA's specs;
    SXM parts)."""

    arch: int
    sms: int
    clock_ghz: float
    hbm_tbps: float
    shared_per_sm: int

    def card(self) -> pd.Card:
        return pd.Card(sms=self.sms, shared_per_sm=self.shared_per_sm)


GPUS: dict[str, Gpu] = {
    "h100": Gpu(arch=90, sms=132, clock_ghz=1.98, hbm_tbps=3.35, shared_per_sm=233472),
    "h200": Gpu(arch=90, sms=132, clock_ghz=1.98, hbm_tbps=4.8, shared_per_sm=233472),
    "a100": Gpu(arch=80, sms=108, clock_ghz=1.41, hbm_tbps=2.04, shared_per_sm=167936),
}


@dataclass(frozen=True)
class DecodeShape:
    """What decode attention sees of a model: query heads, KV heads (rows per sequence), key and value
    widths and layers (the merge's cost is per layer)."""

    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    layers: int
    dense: bool = True  # a target shape of the report (latent attention is listed, not targeted)


SHAPES: dict[str, DecodeShape] = {
    "llama-3.1-8b": DecodeShape(32, 8, 128, 128, 32),
    "qwen2.5-7b": DecodeShape(28, 4, 128, 128, 28),
    "mistral-7b": DecodeShape(32, 8, 128, 128, 32),
    "gemma-3-12b": DecodeShape(16, 8, 256, 256, 48),
    # DeepSeek V3's latent attention as kvpolicy caches it: one latent row (512 + 64 RoPE) per token,
    # 128 absorbed query heads read it, the value is the latent's first 512 columns.
    "deepseek-v3-latent": DecodeShape(128, 1, 576, 512, 61, dense=False),
}

#: Variants a decode step launches: plain, and with per-slot scores (H2O, TOVA, decode-time eviction).
VARIANTS = {"plain": False, "scores": True}
#: Dependent memory round trips of the merge (lse, then the partials it weighs), ~1 us each from HBM.
_MERGE_ROUND_TRIP_US = 1.0
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8"}

# -- compiling without a device -------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """One compiled variant: resources and the main loop's instructions per warp."""

    registers: int
    spills: int
    shared_bytes: int
    loop_instructions: int
    loop_dots: int
    sass: str


def _bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise RuntimeError(f"{path} is missing: this Triton build has no nvidia backend tools")
    return str(path)


def _signature(
    fn: Any, values: dict[str, Any], constexprs: dict[str, Any], runtime: tuple[str, ...]
) -> tuple[dict[str, str], dict[tuple[int, ...], Any], dict[tuple[int, ...], Any]]:
    """Triton's signature, constants and attributes for ``values`` as its launcher would specialise them:
    pointers 16-byte aligned, integers equal to 1 made constants and multiples of 16 marked divisible
    (``runtime`` ones excepted: the kernels mark them ``do_not_specialize``)."""
    signature: dict[str, str] = {}
    constants: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in constexprs:
            signature[name], constants[(i,)] = "constexpr", constexprs[name]
            continue
        value = values[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + {**_TYPES, torch.int64: "i64", torch.int32: "i32"}[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in runtime:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0 and name not in runtime:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


_COMPILED: dict[tuple[Any, ...], Compiled] = {}


def compile_variant(
    fn: Any, values: dict[str, Any], constexprs: dict[str, Any], arch: int, num_warps: int, num_stages: int
) -> Compiled:
    """Compile ``fn`` for ``sm_<arch>`` with no device and read its resources and main loop."""
    signature, constants, attrs = _signature(fn, values, constexprs, pd._RUNTIME_INTS)
    # what Triton specialises on, so two contexts whose values specialise alike share one compile
    key = (fn.__name__, repr(signature), repr(constants), repr(attrs), arch, num_warps, num_stages)
    if key in _COMPILED:
        return _COMPILED[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(
        ASTSource(fn, signature, constants, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": pd.FP_FUSION},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage.stdout)
    local = re.search(r"LOCAL:(\d+)", usage.stdout)
    if regs is None or not sass:
        raise RuntimeError(
            f"cuobjdump gave no resource usage or SASS for {fn.__name__}: {usage.stderr[-500:]}"
        )
    instructions, dots = main_loop(sass)
    _COMPILED[key] = Compiled(
        registers=int(regs.group(1)),
        spills=int(local.group(1)) if local else 0,
        shared_bytes=int(kernel.metadata.shared),
        loop_instructions=instructions,
        loop_dots=dots,
        sass=sass,
    )
    return _COMPILED[key]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)")
_DOT = re.compile(r"\b(HMMA|HGMMA|WGMMA|IMMA)")


def main_loop(sass: str) -> tuple[int, int]:
    """Instructions per warp in one iteration of the kernel's main loop, and the tensor-core
    instructions among them: the backward branch whose body holds the most dots (the tile loop), else
    the longest loop; ``(0, 0)`` for straight-line code (the merge)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in _LINE.finditer(sass)]
    best = (0, 0)
    for address, text in lines:
        branch = _BRANCH.search(text)
        if branch is None:
            continue
        target = int(branch.group(1), 16)
        if target >= address:
            continue
        body = [t for a, t in lines if target <= a <= address]
        dots = sum(1 for t in body if _DOT.search(t))
        best = max(best, (dots, len(body)))
    return best[1], best[0]


# -- the report -----------------------------------------------------------------------------------------


@dataclass
class KernelRow:
    """One kernel of one decode configuration (``--json`` gives a list of these)."""

    shape: str
    gpu: str
    batch: int
    context: int
    kernel: str
    kv: str = "16-bit"
    registers: int | None = None
    spills: int | None = None
    shared_bytes: int | None = None
    programs_per_sm: int | None = None
    splits: int | None = None
    programs: int | None = None
    waves: float | None = None
    instructions_per_byte: float | None = None
    issue_ceiling_tbps: float | None = None
    hbm_tbps: float = 0.0
    merge_bytes: int | None = None
    merge_us: float | None = None
    merge_ms_per_token: float | None = None
    meets_targets: bool | None = None
    note: str = ""


def split_values(
    shape: DecodeShape, dtype: torch.dtype, width: int, blk: int, storage: KVStorage | None = None
) -> dict[str, Any]:
    """The split kernel's runtime arguments for a shape: their types and the values Triton specialises on
    (the strides of contiguous pools, a query laid out as the model's head transpose leaves it); with a
    quantized ``storage``, pools of byte codes and float16 scales as :class:`~kvpolicy.quant.QuantizedLayer`
    holds them."""
    n_rep = shape.heads // shape.kv_heads
    d, dv = shape.head_dim, shape.value_dim
    kivi = storage is not None and storage.layout == "kivi"
    residual = storage.residual if kivi else 0  # type: ignore[union-attr]
    if storage is not None and storage.quantized:
        per = 1 if storage.format == "fp8" else 8 // storage.bits
        kc, vc, kg, vg = d // per, dv // per, d // storage.group(d), dv // storage.group(dv)
        pools = {
            "k_ptr": torch.uint8,
            "v_ptr": torch.uint8,
            "ks_ptr": torch.float16,
            "kz_ptr": torch.float16,
            "vs_ptr": torch.float16,
            "vz_ptr": torch.float16,
        }
        scales = {"sstride_kp": blk * kg, "sstride_ks": kg, "sstride_vp": blk * vg, "sstride_vs": vg}
        if kivi:  # key scales are records of a scale per channel, addressed through each slot's index
            scales = {**scales, "sstride_kp": d, "sstride_ks": 1}
    else:
        kc, vc = d, dv
        pools = {
            "k_ptr": dtype,
            "v_ptr": dtype,
            "ks_ptr": dtype,
            "kz_ptr": dtype,
            "vs_ptr": dtype,
            "vz_ptr": dtype,
        }
        scales = {"sstride_kp": 0, "sstride_ks": 0, "sstride_vp": 0, "sstride_vs": 0}
    return {
        "q_ptr": dtype, **pools, "table_ptr": torch.int64, "len_ptr": torch.int64,
        "part_ptr": torch.float32, "lse_ptr": torch.float32, "score_ptr": torch.float32,
        "rec_ptr": torch.int32 if kivi else dtype, "rk_ptr": dtype, "rv_ptr": dtype,
        "scale": d**-0.5, "cap": 1.0,
        "stride_qr": n_rep * d, "stride_qn": d, "stride_qd": 1,
        "stride_kp": blk * kc, "stride_ks": kc, "stride_kd": 1,
        "stride_vp": blk * vc, "stride_vs": vc, "stride_vd": 1,
        **scales,
        "rstride_kr": residual * d, "rstride_kp": d, "rstride_vr": residual * dv, "rstride_vp": dv,
        "stride_tr": width, "stride_tc": 1,
        "n_rep": n_rep, "d": d, "dv": dv, "tiles_per_split": 2, "slots": width * blk,
    }  # fmt: skip


def merge_values(shape: DecodeShape, dtype: torch.dtype) -> dict[str, Any]:
    n_rep = shape.heads // shape.kv_heads
    return {
        "part_ptr": torch.float32, "lse_ptr": torch.float32, "sink_ptr": torch.float32, "out_ptr": dtype,
        "row_lse_ptr": torch.float32, "n_rep": n_rep, "dv": shape.value_dim, "num_heads": shape.kv_heads,
        "splits": 2, "stride_or": n_rep * shape.value_dim, "stride_on": shape.value_dim, "stride_od": 1,
    }  # fmt: skip


def report(
    shapes: list[str],
    gpus: list[str],
    batches: list[int],
    contexts: list[int],
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 64,
    storages: list[KVStorage] | None = None,
) -> list[KernelRow]:
    """Every kernel a decode step launches, for each shape, KV storage (default: the model's dtype),
    card, batch and context (tokens per row)."""
    from kvpolicy.storage import KVStorage

    split_fn, merge_fn = pd._kernels(False)
    rows_out: list[KernelRow] = []
    for name, storage in ((n, st) for n in shapes for st in storages or [KVStorage()]):
        shape = SHAPES[name]
        n_rep = shape.heads // shape.kv_heads
        p = pd.plan(n_rep, shape.head_dim, shape.value_dim, block_size, dtype, interpret=False)
        elem = torch.finfo(dtype).bits // 8
        quant: tuple[int, bool, int, int] = (0, False, 1, 1)
        if storage.quantized:
            groups = (storage.group(shape.head_dim), storage.group(shape.value_dim))
            why = pd.unserved(n_rep, shape.head_dim, shape.value_dim, groups)
            quant = (storage.bits, storage.format == "fp8", *groups)
            # what a full tile reads from HBM: codes and their float16 scales
            tile_bytes = p.tile * (
                shape.head_dim * storage.bytes_per_element(shape.head_dim)
                + shape.value_dim * storage.bytes_per_element(shape.value_dim)
            )
        else:
            why = pd.unserved(n_rep, shape.head_dim, shape.value_dim)
            tile_bytes = p.tile * (shape.head_dim + shape.value_dim) * elem
        for gpu_name in gpus:
            gpu = GPUS[gpu_name]
            for batch in batches:
                for context in contexts:
                    base = {
                        "shape": name,
                        "kv": storage.label,
                        "gpu": gpu_name,
                        "batch": batch,
                        "context": context,
                    }
                    if why is not None:
                        rows_out.append(
                            KernelRow(
                                **base, kernel="torch path", hbm_tbps=gpu.hbm_tbps, note=f"torch path: {why}"
                            )
                        )
                        continue
                    width = math.ceil(context / block_size) + 1
                    rows = batch * shape.kv_heads
                    values = split_values(shape, dtype, width, block_size, storage)
                    splits = 1
                    for variant, scores in VARIANTS.items():
                        c = compile_variant(
                            split_fn,
                            values,
                            pd.split_constexprs(
                                p, block_size, False, scores, False, quant, dtype, storage.layout == "kivi"
                            ),
                            gpu.arch,
                            p.num_warps,
                            p.num_stages,
                        )
                        per_sm = pd.occupancy(c.registers, c.shared_bytes, p.num_warps, gpu.card())
                        slots = gpu.sms * max(per_sm, 1)
                        splits = pd.choose_splits(rows, width, slots)
                        ipb = c.loop_instructions * p.num_warps / tile_bytes
                        ceiling = gpu.sms * gpu.clock_ghz * 1e9 * 4 / ipb / 1e12
                        row = KernelRow(
                            **base,
                            kernel=f"split ({variant})",
                            registers=c.registers,
                            spills=c.spills,
                            shared_bytes=c.shared_bytes,
                            programs_per_sm=per_sm,
                            splits=splits,
                            programs=rows * splits,
                            waves=round(rows * splits / slots, 2),
                            instructions_per_byte=round(ipb, 4),
                            issue_ceiling_tbps=round(ceiling, 1),
                            hbm_tbps=gpu.hbm_tbps,
                            note=f"{c.loop_instructions} instr/warp per {p.tile}-slot tile, {c.loop_dots} dots",
                        )
                        row.meets_targets = bool(
                            c.spills == 0 and ceiling >= 2 * gpu.hbm_tbps and _whole(row.waves)
                        )
                        rows_out.append(row)
                    merge = pd.merge_constexprs(p, splits, has_sinks=False)
                    m = compile_variant(
                        merge_fn, merge_values(shape, dtype), merge, gpu.arch, pd.MERGE_WARPS, 1
                    )
                    traffic = rows * splits * n_rep * (shape.value_dim + 1) * 4 * 2  # written, read once
                    merge_us = traffic / (gpu.hbm_tbps * 1e6) + _MERGE_ROUND_TRIP_US * (
                        2 if splits > 1 else 1
                    )
                    rows_out.append(
                        KernelRow(
                            **base,
                            kernel="merge",
                            registers=m.registers,
                            spills=m.spills,
                            shared_bytes=m.shared_bytes,
                            programs_per_sm=pd.occupancy(
                                m.registers, m.shared_bytes, pd.MERGE_WARPS, gpu.card()
                            ),
                            splits=splits,
                            programs=rows * n_rep * math.ceil(shape.value_dim / merge["BV"]),
                            hbm_tbps=gpu.hbm_tbps,
                            merge_bytes=traffic,
                            merge_us=round(merge_us, 2),
                            merge_ms_per_token=round(merge_us * shape.layers / 1000, 3),
                            meets_targets=m.spills == 0,
                            note=f"all {splits} splits in one load, {merge['BV']} columns a program",
                        )
                    )
    return rows_out


def _whole(waves: float | None) -> bool:
    """The grid's programs fill at least 90 % of the waves they take (the tail wave idles the rest)."""
    return waves is not None and waves > 0 and waves / math.ceil(waves) >= 0.9


def format_table(rows: list[KernelRow]) -> str:
    head = (
        "| shape | KV | gpu | batch | context | kernel | regs | spills | shared KB | prog/SM | splits | waves "
        "| instr/byte | issue ceiling TB/s | HBM TB/s | merge us (ms/token) | targets | note |"
    )
    lines = [head, "|" + "---|" * 18]
    for r in rows:

        def f(v: Any, fmt: str = "{}") -> str:
            return "-" if v is None else fmt.format(v)

        merge = "-" if r.merge_us is None else f"{r.merge_us} ({r.merge_ms_per_token})"
        lines.append(
            f"| {r.shape} | {r.kv} | {r.gpu} | {r.batch} | {r.context} | {r.kernel} | {f(r.registers)} | {f(r.spills)} "
            f"| {f(r.shared_bytes and r.shared_bytes / 1024, '{:.1f}')} | {f(r.programs_per_sm)} | {f(r.splits)} "
            f"| {f(r.waves)} | {f(r.instructions_per_byte)} | {f(r.issue_ceiling_tbps)} | {r.hbm_tbps} "
            f"| {merge} | {f(r.meets_targets and 'met' if r.meets_targets is not None else None)} | {r.note} |"
        )
    return "\n".join(lines).replace("| False |", "| missed |")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``bench kernel``'s own options (``--lengths`` and ``--batch-sizes`` are bench's)."""
    p.add_argument(
        "--shape",
        action="append",
        choices=[*SHAPES, "all"],
        help="kernel mode: decode shape to report (repeatable; default llama-3.1-8b; 'all' for every one)",
    )
    p.add_argument(
        "--gpu",
        action="append",
        choices=sorted(GPUS),
        help="kernel mode: card to compile for (repeatable; default h100 and h200)",
    )
    p.add_argument(
        "--kv-bits",
        action="append",
        help="KV storage: 16, 8, fp8, 4, 2, kivi4, kivi2 (prefill and e2e: every policy's; kernel mode: the variants to compile, repeatable; default 16)",
    )
    p.add_argument("--json", action="store_true", help="kernel mode: print the rows as a JSON list")


def run(args: argparse.Namespace) -> int:
    """``kvpolicy bench kernel``: compile, read and print (``--out`` writes the JSON too)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("bench kernel compiles with Triton: pip install triton") from exc
    shapes = list(SHAPES) if "all" in (args.shape or []) else (args.shape or ["llama-3.1-8b"])
    gpus = args.gpu or ["h100", "h200"]
    batches = [int(b) for b in (args.batch_sizes or "1,64").split(",")]
    if any(b < 1 for b in batches):
        raise ValueError(f"--batch-sizes must be positive integers in kernel mode, got {args.batch_sizes!r}")
    contexts = args.lengths or [8192, 131072]
    from kvpolicy.storage import KVStorage

    storages = [KVStorage.parse(b) for b in args.kv_bits or ["16"]]
    rows = report(shapes, gpus, batches, contexts, storages=storages)
    data = [asdict(r) for r in rows]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1) if args.json else format_table(rows))
    missed = [r for r in rows if r.meets_targets is False and SHAPES[r.shape].dense]
    if missed and not args.json:
        print(
            f"{len(missed)} kernel rows of dense shapes miss the targets (no spills, whole waves, issue >= 2x HBM)"
        )
    return 0
