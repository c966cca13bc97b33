"""Split-K (flash-decoding) decode attention over kvpolicy's paged, ragged cache, in Triton.

Same contract as :func:`kvpolicy.cache.paged_attention` (see :func:`paged_decode_attention`), without
the torch path's costs: it gathers the queries per page, reads every allocated page (reserve, empty tail,
freed slots), accumulates partial outputs in the pool's dtype and merges pages with contended atomics
(about 1.6x the minimum traffic in some 26 kernels at 128K tokens). Here:

* **Kernel 1**, grid ``(R, SPLITS)`` over rows ``R = B * H_kv`` (one ``(sequence, KV head)`` each) and
  splits of the row's pages. A program loads its row's ``n_rep`` queries once (padded to 16 rows, the
  tensor cores' smallest tile), walks its pages through the block table in tiles of ``TILE`` slots (a
  whole 64-slot page where registers allow), reads only tiles holding slots ``< length`` (a row's
  entries always sit in slots ``0..length-1``, so cost follows kept entries, not allocated pages) and
  keeps an online softmax (running max and sum, fp32). Both products of a tile are ``tl.dot`` (tensor
  cores; operands in the pool's dtype, fp32 accumulation): the query group as a broadcast-multiply and
  reduce compiled to ~1,850 instructions per warp per 16 slots (shuffles, shared-memory transposes),
  an issue ceiling of ~1.1 TB/s on an H100/H200 whatever the memory system does; as dots the loop is
  ~20x fewer instructions per KV byte, so it is bound by memory (``kvpolicy bench kernel`` prints the
  figures from the compiled code). It writes its normalised partial output and log-sum-exp per query
  head, and with ``want_probs`` each kept slot's (soft-capped) scaled score.
* **Kernel 2** (merge), grid ``(R, n_rep, d_v chunks)``: the exact log-sum-exp merge of the splits in
  fp32, every split loaded at once (one round trip, not one per split), the sinks' share in the
  denominator, the output in the query's dtype, and each query head's total log-sum-exp (so
  probabilities are ``exp(score - lse)``).

The number of splits depends only on static facts (rows, block-table width, the device and the compiled
kernel's occupancy), never on ``lengths``: a decode step reads nothing back and keeps static shapes, so
it can be captured in a CUDA graph. Triton is imported on first use; ``kvpolicy.kernels.available()``
says whether it can run. Shapes the kernel does not serve well (:func:`unserved`: latent attention's
576-wide heads) take the torch path.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kvpolicy.cache import PagedLayer, layer_storage, paged_attention

#: Stands for ``triton.language`` in the kernels' source. Triton is optional, so the functions below stay
#: plain (never called) here; :func:`_kernels` runs copies of them with ``tl`` bound to Triton's.
tl: Any = None

#: Widest (padded) head the kernel serves: a 64-slot key tile of 256 bf16 columns is 32 KB, and wider
#: heads (latent attention's 576, padded to 1024) spill registers; they take the torch path.
MAX_HEAD_DIM = 256
#: Largest query group per KV head the kernel serves (padded rows of the dot).
MAX_GROUP = 64
#: ``TILE * D_P`` at most, compiled: 64 slots of a 128-wide head (one page of Llama-3.1-8B's cache), 32
#: of a 256-wide one. Keeps the key and value tiles at 16 KB each in bf16 and the kernel spill-free.
_TILE_ELEMENTS = 8192
#: Warps per split program and software-pipelining stages of its tile loop (compiled): 4 warps share a
#: 16 x 64 score tile; 2 stages keep the next tile's keys and values in flight while one is computed.
NUM_WARPS = 4
NUM_STAGES = 2
#: Warps per merge program (straight-line code: no stages to pipeline).
MERGE_WARPS = 4
#: Fused multiply-adds, as Triton has always compiled them (stated: Triton 3.10 changes the default).
FP_FUSION = True
#: Scheduling cost of one split program beyond its tiles, in pages (its queries, the partial output
#: and log-sum-exp it writes, its share of the merge): what :func:`choose_splits` weighs against waves.
_PROGRAM_OVERHEAD_PAGES = 2


def _add(a, b):
    return a + b


def _max(a, b):
    return tl.maximum(a, b)


# Only builtins of ``tl`` and this module's functions are used in the kernels (``tl.full``, not
# ``tl.zeros``; ``tl.reduce`` with ``_add``/``_max``, not ``tl.sum``/``tl.max``): Triton's standard-library
# functions were wrapped when Triton was imported, for the interpreter only if ``TRITON_INTERPRET=1`` was
# set before that import. This module's functions are wrapped per mode by ``_kernels``.


def _load_entries(
    ptr,
    s_ptr,
    z_ptr,
    page,
    within,
    ok,
    width,
    stride_p,
    stride_s,
    stride_c,
    sstride_p,
    sstride_s,
    rec,
    r_ptr,
    rstride_r,
    rstride_p,
    row64,
    TILE_P: tl.constexpr,
    W_P: tl.constexpr,
    QBITS: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    OP: tl.constexpr,
    DT: tl.constexpr,
    KIVI: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """A tile's keys or values ``(TILE_P, W_P)`` in the operand dtype ``OP``: loaded as stored
    (``QBITS == 0``), or dequantized in registers from ``QBITS``-bit codes (``8 / QBITS`` to a byte, code
    ``j`` of byte ``m`` being column ``m * 8 / QBITS + j``) or fp8 e4m3 bytes (``FP8``), times the float16
    scale of each ``GROUP`` columns (plus its zero point for integers): only the codes and scales cross
    the memory bus (:mod:`kvpolicy.storage`). Dequantized entries are rounded to the model's dtype ``DT``
    first (a no-op where the operands are in it), so every path reads the same cache.

    ``KIVI`` (:class:`kvpolicy.quant.KiviLayer`): ``rec`` ``(TILE_P,)`` is each slot's key record (``>= 1``)
    or ``-(p + 1)`` for position ``p`` of the row's full-precision residual ``r_ptr`` (row ``row64``);
    with ``PER_CHANNEL`` (keys) the scale and zero point are the record's, one per column."""
    if QBITS == 0:
        offs = tl.arange(0, W_P)
        out = tl.load(
            ptr + page * stride_p + within[:, None] * stride_s + offs[None, :] * stride_c,
            mask=ok[:, None] & (offs[None, :] < width),
            other=0.0,
        ).to(OP)
    else:  # (a static branch: only the taken one is compiled, so no early return)
        PER: tl.constexpr = 1 if FP8 else 8 // QBITS
        offs_b = tl.arange(0, W_P // PER)
        raw = tl.load(
            ptr + page * stride_p + within[:, None] * stride_s + offs_b[None, :] * stride_c,
            mask=ok[:, None] & (offs_b[None, :] < width // PER),
            other=0,
        )
        if FP8:
            # e4m3's sign, exponent and mantissa moved into a float16's (exact, subnormals too), times 2^(15 - 7)
            r = raw.to(tl.uint16)
            half = (((r & 0x80) << 8) | ((r & 0x7F) << 7)).to(tl.float16, bitcast=True)
            vals = half.to(tl.float32) * 256.0
        elif PER == 1:
            vals = raw.to(tl.float32)
        elif PER == 2:
            vals = tl.reshape(tl.join(raw & 0xF, raw >> 4), (TILE_P, W_P)).to(tl.float32)
        else:
            c0, c1, c2, c3 = raw & 3, (raw >> 2) & 3, (raw >> 4) & 3, raw >> 6
            vals = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (TILE_P, W_P)).to(tl.float32)
        if PER_CHANNEL:  # KIVI's keys: the slot's record, a scale and zero point per column
            offs_c = tl.arange(0, W_P)
            at = tl.maximum(rec, 0).to(tl.int64)[:, None] * width + offs_c[None, :]
            c_ok = ok[:, None] & (offs_c[None, :] < width)
            scale = tl.load(s_ptr + at, mask=c_ok, other=0.0).to(tl.float32)
            vals = vals * scale + tl.load(z_ptr + at, mask=c_ok, other=0.0).to(tl.float32)
        else:
            G_P: tl.constexpr = W_P // GROUP
            offs_g = tl.arange(0, G_P)
            at = page * sstride_p + within[:, None] * sstride_s + offs_g[None, :]
            g_ok = ok[:, None] & (offs_g[None, :] < width // GROUP)
            scale = tl.load(s_ptr + at, mask=g_ok, other=0.0).to(tl.float32)
            vals = tl.reshape(vals, (TILE_P, G_P, GROUP)) * scale[:, :, None]
            if not FP8:
                vals += tl.load(z_ptr + at, mask=g_ok, other=0.0).to(tl.float32)[:, :, None]
            vals = tl.reshape(vals, (TILE_P, W_P))
        if KIVI:  # entries still in the row's residual: as stored, in the model's dtype
            offs_c = tl.arange(0, W_P)
            fresh = rec < 0
            res = tl.load(
                r_ptr
                + row64 * rstride_r
                + tl.maximum(-rec - 1, 0).to(tl.int64)[:, None] * rstride_p
                + offs_c[None, :],
                mask=(ok & fresh)[:, None] & (offs_c[None, :] < width),
                other=0.0,
            ).to(tl.float32)
            vals = tl.where(fresh[:, None], res, vals)
        out = vals.to(DT).to(OP)
    return out


def _attend_tile(
    q,
    t,
    row64,
    length,
    m_i,
    l_i,
    acc,
    k_ptr,
    v_ptr,
    ks_ptr,
    kz_ptr,
    vs_ptr,
    vz_ptr,
    table_ptr,
    score_ptr,
    rec_ptr,
    rk_ptr,
    rv_ptr,
    scale,
    cap,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
    sstride_kp,
    sstride_ks,
    sstride_vp,
    sstride_vs,
    rstride_kr,
    rstride_kp,
    rstride_vr,
    rstride_vp,
    stride_tr,
    stride_tc,
    n_rep,
    d,
    dv,
    slots,
    BLK: tl.constexpr,
    TILE: tl.constexpr,
    TILE_P: tl.constexpr,
    NREP_P: tl.constexpr,
    D_P: tl.constexpr,
    DV_P: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WANT_SCORES: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
    QBITS: tl.constexpr,
    FP8: tl.constexpr,
    GROUP_K: tl.constexpr,
    GROUP_V: tl.constexpr,
    DT: tl.constexpr,
    KIVI: tl.constexpr,
):
    """Fold tile ``t`` (slots ``t * TILE ...``, all in one page: ``TILE`` divides ``BLK``) of row ``row64``
    into the online softmax ``(m_i, l_i) (NREP_P,)``, ``acc (NREP_P, DV_P)`` of the queries
    ``q (NREP_P, D_P)`` (already in the operand dtype ``OP``)."""
    offs_r = tl.arange(0, NREP_P)
    offs_n = tl.arange(0, TILE_P)
    first = t * TILE
    page = tl.load(table_ptr + row64 * stride_tr + (first // BLK) * stride_tc).to(tl.int64)
    within = first % BLK + offs_n
    slot = first + offs_n
    ok = (offs_n < TILE) & (slot < length)
    if KIVI:  # noqa: SIM108 (a static branch: only the taken side is compiled) each slot's key record, or its place in the residual
        rec = tl.load(rec_ptr + page * BLK + within, mask=ok, other=0)
    else:
        rec = within
    k = _load_entries(
        k_ptr, ks_ptr, kz_ptr, page, within, ok, d, stride_kp, stride_ks, stride_kd, sstride_kp, sstride_ks,
        rec, rk_ptr, rstride_kr, rstride_kp, row64, TILE_P, D_P, QBITS, FP8, GROUP_K, OP, DT, KIVI, KIVI,
    )  # fmt: skip
    # (NREP_P, TILE_P) on tensor cores, fp32 accumulation
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if SOFTCAP:
        # cap * tanh(s / cap); Triton's interpreter has no tanh. exp form for |x| >= 1/8, odd Taylor series
        # below it (the exp form loses relative accuracy near 0; the series is exact there to ~1e-9).
        x = s / cap
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        far = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        near = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 - x2 * 0.05396825396825397)))
        th = tl.where(ax < 0.125, near, far)
        s = cap * tl.where(x < 0, -th, th)
    if WANT_SCORES:
        tl.store(
            score_ptr + (row64 * n_rep + offs_r[:, None]) * slots + slot[None, :],
            s,
            mask=(offs_r[:, None] < n_rep) & ok[None, :],
        )
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))  # finite: a tile's first slot is always < length
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    v = _load_entries(
        v_ptr, vs_ptr, vz_ptr, page, within, ok, dv, stride_vp, stride_vs, stride_vd, sstride_vp, sstride_vs,
        rec, rv_ptr, rstride_vr, rstride_vp, row64, TILE_P, DV_P, QBITS, FP8, GROUP_V, OP, DT, KIVI, False,
    )  # fmt: skip
    acc = tl.dot(p.to(OP), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    kz_ptr,
    vs_ptr,
    vz_ptr,
    table_ptr,
    len_ptr,
    part_ptr,
    lse_ptr,
    score_ptr,
    rec_ptr,
    rk_ptr,
    rv_ptr,
    scale,
    cap,
    stride_qr,
    stride_qn,
    stride_qd,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
    sstride_kp,
    sstride_ks,
    sstride_vp,
    sstride_vs,
    rstride_kr,
    rstride_kp,
    rstride_vr,
    rstride_vp,
    stride_tr,
    stride_tc,
    n_rep,
    d,
    dv,
    tiles_per_split,
    slots,
    BLK: tl.constexpr,
    TILE: tl.constexpr,
    TILE_P: tl.constexpr,
    NREP_P: tl.constexpr,
    D_P: tl.constexpr,
    DV_P: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WANT_SCORES: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
    STAGES: tl.constexpr,
    INTERPRET: tl.constexpr,
    QBITS: tl.constexpr,
    FP8: tl.constexpr,
    GROUP_K: tl.constexpr,
    GROUP_V: tl.constexpr,
    DT: tl.constexpr,
    KIVI: tl.constexpr,
):
    """One (row, split): partial output ``part[row, split] (n_rep, dv)`` normalised by its own
    softmax sum, and its log-sum-exp ``lse[row, split] (n_rep,)`` (``-inf`` when it holds no entry)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row64 = row.to(tl.int64)
    offs_r = tl.arange(0, NREP_P)
    offs_d = tl.arange(0, D_P)
    offs_v = tl.arange(0, DV_P)
    q = tl.load(
        q_ptr + row64 * stride_qr + offs_r[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=(offs_r[:, None] < n_rep) & (offs_d[None, :] < d),
        other=0.0,
    ).to(OP)
    length = tl.load(len_ptr + row64).to(tl.int32)
    # this split's tiles [lo, hi), clipped to the tiles the row uses: slots >= length are never read
    lo = split * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, (length + TILE - 1) // TILE)
    m_i = tl.full([NREP_P], float("-inf"), tl.float32)
    l_i = tl.full([NREP_P], 0.0, tl.float32)
    acc = tl.full([NREP_P, DV_P], 0.0, tl.float32)
    if INTERPRET:
        # Triton 3.6's interpreter cannot range() over runtime scalars under numpy >= 2.4 (they are
        # 1-element arrays); a while loop works there. Compiled, tl.range pipelines the tile loads.
        t = lo
        while t < hi:
            m_i, l_i, acc = _attend_tile(
                q, t, row64, length, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr,
                score_ptr, rec_ptr, rk_ptr, rv_ptr, scale, cap, stride_kp, stride_ks, stride_kd, stride_vp,
                stride_vs, stride_vd, sstride_kp, sstride_ks, sstride_vp, sstride_vs, rstride_kr, rstride_kp,
                rstride_vr, rstride_vp, stride_tr, stride_tc, n_rep, d, dv, slots,
                BLK, TILE, TILE_P, NREP_P, D_P, DV_P, SOFTCAP, WANT_SCORES, OP, PREC, QBITS, FP8, GROUP_K,
                GROUP_V, DT, KIVI,
            )  # fmt: skip
            t += 1
    else:
        for t in tl.range(lo, hi, num_stages=STAGES):
            m_i, l_i, acc = _attend_tile(
                q, t, row64, length, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, table_ptr,
                score_ptr, rec_ptr, rk_ptr, rv_ptr, scale, cap, stride_kp, stride_ks, stride_kd, stride_vp,
                stride_vs, stride_vd, sstride_kp, sstride_ks, sstride_vp, sstride_vs, rstride_kr, rstride_kp,
                rstride_vr, rstride_vp, stride_tr, stride_tc, n_rep, d, dv, slots,
                BLK, TILE, TILE_P, NREP_P, D_P, DV_P, SOFTCAP, WANT_SCORES, OP, PREC, QBITS, FP8, GROUP_K,
                GROUP_V, DT, KIVI,
            )  # fmt: skip
    held = l_i > 0.0
    safe = tl.where(held, l_i, 1.0)
    lse = tl.where(held, m_i + tl.log(safe), float("-inf"))
    # only the group's real rows and columns: the padding would multiply the merge's traffic
    base = (row64 * splits + split) * n_rep
    r_ok = offs_r < n_rep
    tl.store(lse_ptr + base + offs_r, lse, mask=r_ok)
    tl.store(
        part_ptr + (base + offs_r[:, None]) * dv + offs_v[None, :],
        acc / safe[:, None],
        mask=r_ok[:, None] & (offs_v[None, :] < dv),
    )


def _merge_kernel(
    part_ptr,
    lse_ptr,
    sink_ptr,
    out_ptr,
    row_lse_ptr,
    n_rep,
    dv,
    num_heads,
    splits,
    stride_or,
    stride_on,
    stride_od,
    SPLITS_P: tl.constexpr,
    BV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One (row, query head, chunk of ``BV`` value columns): ``out[row, r, chunk]`` = the splits' partials
    weighted by ``exp(lse_s - lse)``, all splits loaded at once; the chunk-0 program also writes the
    head's total log-sum-exp ``row_lse[row, r]`` (sinks included)."""
    row = tl.program_id(0)
    r = tl.program_id(1)
    chunk = tl.program_id(2)
    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P)
    offs_v = chunk * BV + tl.arange(0, BV)
    s_ok = offs_s < splits
    base = (row64 * splits + offs_s) * n_rep + r  # (SPLITS_P,) this head's entry of every split
    lse = tl.load(lse_ptr + base, mask=s_ok, other=float("-inf"))
    m = tl.reduce(lse, 0, _max)
    if HAS_SINKS:
        sink = tl.load(sink_ptr + (row % num_heads) * n_rep + r).to(tl.float32)
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row without entries (and no sink): every weight is 0
    w = tl.exp(lse - m)
    denom = tl.reduce(w, 0, _add)
    if HAS_SINKS:
        denom += tl.exp(sink - m)  # the sink's share: in the denominator, no value
    part = tl.load(
        part_ptr + base[:, None] * dv + offs_v[None, :],
        mask=s_ok[:, None] & (offs_v[None, :] < dv),
        other=0.0,
    )
    safe = tl.where(denom > 0.0, denom, 1.0)
    out = tl.reduce(w[:, None] * part, 0, _add) / safe
    tl.store(
        out_ptr + row64 * stride_or + r * stride_on + offs_v * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_v < dv,
    )
    if chunk == 0:
        tl.store(row_lse_ptr + row64 * n_rep + r, m + tl.log(safe))


#: ``{interpreted: (split kernel, merge kernel)}`` once built; a plain global (not a cached function) so
#: that ``torch.compile`` tracing a decode step after the first call only reads a constant.
_KERNELS: dict[bool, tuple[Any, Any]] = {}
#: Arguments that change with the batch's shape and must not make Triton compile another variant (it
#: specialises integers equal to 1 or divisible by 16 by default).
_RUNTIME_INTS = ("tiles_per_split", "splits")


def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The two kernels, compiled for CUDA or for Triton's interpreter, built on first use (importing
    Triton then, not when this module is imported).

    Each mode gets its own copies of this module's functions over a private namespace in which ``tl`` and
    the helpers they call are bound: Triton resolves a kernel's names through its globals, the interpreter
    adds its own names to them, and which wrapper a function gets must not depend on ``TRITON_INTERPRET``
    at the time Triton was first imported (transformers' model imports pull it in early).
    """
    if interpret not in _KERNELS:
        import triton
        import triton.language

        namespace: dict[str, Any] = {
            "__name__": __name__,
            "__builtins__": __builtins__,
            "tl": triton.language,
        }

        def bind(fn: Any, **options: Any) -> Any:
            clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
            clone.__module__, clone.__qualname__ = fn.__module__, fn.__qualname__
            clone.__annotations__, clone.__doc__ = fn.__annotations__, fn.__doc__
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                namespace[fn.__name__] = InterpretedFunction(clone)
            else:
                namespace[fn.__name__] = triton.JITFunction(clone, **options)
            return namespace[fn.__name__]

        for helper in (_add, _max, _load_entries, _attend_tile):
            bind(helper)
        _KERNELS[interpret] = (
            bind(_split_kernel, do_not_specialize=["tiles_per_split"]),
            bind(_merge_kernel, do_not_specialize=["splits"]),
        )
    return _KERNELS[interpret]


# -- the launch plan: tiles, padding, operands, occupancy and splits -------------------------------------
@dataclass(frozen=True)
class Plan:
    """How one decode attention shape is launched: the split kernel's tile (``tile`` slots, a divisor of
    the page, padded to ``tile_p``), the padded group, key and value widths, the dot operands' dtype
    (``operand``: a ``triton.language`` dtype name) and precision, warps and pipelining stages."""

    tile: int
    tile_p: int
    nrep_p: int
    d_p: int
    dv_p: int
    operand: str
    precision: str
    num_warps: int
    num_stages: int

    @property
    def tile_bytes(self) -> int:
        """KV bytes one tile loads when full (keys and values, operand width)."""
        width = 4 if self.operand == "float32" else 2
        return self.tile * (self.d_p + self.dv_p) * width


def _next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (Triton block shapes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


def unserved(n_rep: int, d: int, dv: int, groups: tuple[int, int] = (1, 1)) -> str | None:
    """Why the kernel does not serve this head layout (it then takes the torch path), or ``None``;
    ``groups``: channels per scale of quantized keys and values (:mod:`kvpolicy.storage`)."""
    if any(g & (g - 1) for g in groups):
        return f"quantization groups of {groups} channels are not powers of two (the kernel's tiles)"
    if max(_next_power_of_2(d), _next_power_of_2(dv)) > MAX_HEAD_DIM:
        return f"head width {max(d, dv)} pads past {MAX_HEAD_DIM} (its tiles would spill registers)"
    if n_rep > MAX_GROUP:
        return f"{n_rep} query heads per KV head exceed {MAX_GROUP}"
    return None


def plan(n_rep: int, d: int, dv: int, blk: int, dtype: torch.dtype, interpret: bool) -> Plan:
    """The launch plan of a layer: ``n_rep`` query heads per KV head, key width ``d``, value width ``dv``,
    pages of ``blk`` slots, pool dtype ``dtype``; ``interpret`` for Triton's interpreter.

    Every dot dimension is padded to at least 16 (the tensor cores' smallest tile; masked loads fill the
    padding with zeros). Compiled: the largest power-of-two tile up to one page within
    :data:`_TILE_ELEMENTS`, operands in the pool's 16-bit dtype (fp32 pools: fp32 at IEEE precision, so
    fp32 stays exact to ~1e-6). Interpreted: whole pages (each tile is a Python-level iteration) and fp32
    operands (the interpreter's bf16 ``tl.dot`` is wrong).
    """
    nrep_p = max(16, _next_power_of_2(n_rep))
    d_p, dv_p = max(16, _next_power_of_2(d)), max(16, _next_power_of_2(dv))
    if blk & (blk - 1) or interpret:  # not a power of two (or interpreted): whole pages, padded
        tile = blk
    else:
        tile = blk
        while tile > 16 and tile * max(d_p, dv_p) > _TILE_ELEMENTS:
            tile //= 2
    half = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype)
    operand = half if half is not None and not interpret else "float32"
    return Plan(
        tile=tile,
        tile_p=max(16, _next_power_of_2(tile)),
        nrep_p=nrep_p,
        d_p=d_p,
        dv_p=dv_p,
        operand=operand,
        precision="ieee" if operand == "float32" else "tf32",
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )


@dataclass(frozen=True)
class Card:
    """What occupancy depends on in a CUDA device: SMs, and per SM registers, shared memory, resident
    warps and resident programs (thread blocks)."""

    sms: int
    regs_per_sm: int = 65536
    shared_per_sm: int = 233472
    warps_per_sm: int = 64
    blocks_per_sm: int = 32

    @classmethod
    def of(cls, device: torch.device) -> Card:
        props = torch.cuda.get_device_properties(device)
        return cls(
            sms=props.multi_processor_count,
            regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
            shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 233472),
            warps_per_sm=getattr(props, "max_threads_per_multi_processor", 2048) // 32,
        )


def occupancy(regs: int, shared: int, num_warps: int, card: Card) -> int:
    """Programs of ``num_warps`` warps using ``regs`` registers per thread and ``shared`` bytes of shared
    memory that one SM holds at once: registers are allocated per warp in units of 256 (8 per thread),
    every program reserves 1 KB of shared memory for the system (sm_80 and later)."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (card.regs_per_sm // per_warp) // num_warps
    by_shared = card.shared_per_sm // (shared + 1024)
    return max(0, min(by_regs, by_shared, card.warps_per_sm // num_warps, card.blocks_per_sm))


def choose_splits(rows: int, width: int, slots: int) -> int:
    """Splits per row for ``rows`` rows of ``width`` pages when the device holds ``slots`` programs at
    once (SMs x programs per SM): the count that minimises waves x (pages per split + the overhead of a
    program), so the grid fills whole waves without splitting rows finer than pays (fewer on ties)."""
    best, best_cost = 1, math.inf
    for s in range(1, min(width, 4 * math.ceil(slots / max(rows, 1))) + 1):
        per = math.ceil(width / s)
        used = math.ceil(width / per)  # equal page shares, none of them empty
        cost = math.ceil(rows * used / max(slots, 1)) * (per + _PROGRAM_OVERHEAD_PAGES)
        if cost < best_cost:
            best, best_cost = used, cost
    return best


def num_splits(rows: int, width: int, device: torch.device, programs_per_sm: int | None = None) -> int:
    """Splits per row from static facts only (never ``lengths``: that would need a host read and break
    CUDA-graph capture). On CUDA from the device's SMs and the compiled kernel's ``programs_per_sm``
    (:func:`choose_splits`); elsewhere two per row (the interpreter pays per program). Never more than
    the block table's ``width`` (pages per row), and every split starts on a page."""
    if device.type == "cuda":
        sms = Card.of(device).sms if device.index not in _SMS else _SMS[device.index]
        _SMS[device.index] = sms
        return choose_splits(rows, width, sms * max(programs_per_sm or 1, 1))
    splits = max(1, min(width, 2))
    return math.ceil(width / math.ceil(width / splits))


#: programs per SM assumed where the compiled kernel's cannot be read (the dense shapes' figure).
_ASSUMED_PROGRAMS_PER_SM = 4
#: SMs per CUDA device index (a host-side property, read once per device).
_SMS: dict[int | None, int] = {}
#: programs per SM of each compiled split-kernel variant on each device (read from the compiled kernel
#: once: registers and shared memory decide it, see :func:`occupancy`).
_OCCUPANCY: dict[tuple[Any, ...], int] = {}


def _programs_per_sm(key: tuple[Any, ...], kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Programs per SM of the split kernel as compiled for these arguments (compiles it, once per
    variant: Triton's own cache then serves the launch)."""
    if key not in _OCCUPANCY:
        try:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled._init_handles()  # loads the module: registers are known from here on
            regs, shared = compiled.n_regs, compiled.metadata.shared
            _OCCUPANCY[key] = max(1, occupancy(regs, shared, kwargs["num_warps"], Card.of(args[0].device)))
        except Exception as exc:  # a Triton whose warm-up API differs: the launch itself still works
            warnings.warn(
                f"could not read the decode kernel's occupancy from Triton ({exc!r}); splits assume "
                f"{_ASSUMED_PROGRAMS_PER_SM} programs per SM",
                RuntimeWarning,
                stacklevel=2,
            )
            _OCCUPANCY[key] = _ASSUMED_PROGRAMS_PER_SM
    return _OCCUPANCY[key]


def merge_chunk(splits_p: int, dv_p: int) -> int:
    """Value columns per merge program: all of them while the ``(splits, columns)`` tile stays within
    4,096 fp32 (32 registers per thread at 4 warps), fewer (more programs) when there are many splits."""
    return min(dv_p, max(16, _next_power_of_2(4096 // splits_p)))


def paged_decode_attention(
    query: torch.Tensor,
    layer: PagedLayer,
    scaling: float,
    want_probs: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    *,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kvpolicy.cache.paged_attention` as two Triton kernels: same arguments, same results.

    Args:
        query: ``(B, H_q, 1, d)``; the ``n_rep = H_q / H_kv`` query heads of a group share a row.
        layer: the layer's cache (the new entry already appended); its tensors on ``query``'s device.
        scaling: softmax scale.
        want_probs: also return the attention probabilities per slot (decode-time policies).
        softcap: soft-cap the scores, ``cap * tanh(score / cap)`` (Gemma 2).
        sinks: ``(H_q,)`` learned logit per query head that joins each softmax and takes no value.
        splits: splits per row (tests; default :func:`num_splits`, from static shapes only).

    Returns:
        ``(B, 1, H_q * d_v)`` in the query's dtype, and ``(B, H_kv, n_rep, slots)`` float32 probabilities
        (zero on slots ``>= length``) or ``None``. Reads each kept entry once; fp32 accumulation. No host
        read and static shapes throughout (CUDA-graph capturable); rows with no entries give zeros.
        A head layout the kernel does not serve (:func:`unserved`) runs :func:`~kvpolicy.cache.paged_attention`.
    """
    interpret = query.device.type != "cuda"
    if interpret and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "paged_decode_attention runs compiled on CUDA tensors; on other devices only in Triton's "
            "interpreter (slow), which TRITON_INTERPRET=1 opts into. Check kvpolicy.kernels.available()"
        )
    h_kv = layer.num_heads
    if query.shape[1] % h_kv:
        raise ValueError(f"{query.shape[1]} query heads do not split into groups over {h_kv} KV heads")
    storage = layer_storage(layer)
    kivi: tuple[torch.Tensor | None, ...] = (None, None, None)
    if storage is not None and storage.layout == "kivi":  # key records per slot, a residual per row
        dv = layer.head_dims[1]
        groups = (storage.group_size, storage.group(dv))
        pools = (layer.k_codes, layer.v_codes, layer.rec_scale, layer.rec_zero, layer.v_scale, layer.v_zero)
        quant = (storage.bits, False, *groups)
        kivi = (layer.k_rec, layer.res_k, layer.res_v)
    elif storage is not None and storage.quantized:  # codes and scales: dequantized in registers
        dv = layer.head_dims[1]
        groups = (storage.group(query.shape[-1]), storage.group(dv))
        zeros = (None, None) if storage.format == "fp8" else (layer.k_zero, layer.v_zero)
        pools = (layer.k_codes, layer.v_codes, layer.k_scale, zeros[0], layer.v_scale, zeros[1])
        quant = (storage.bits, storage.format == "fp8", *groups)
    else:
        dv, groups = layer.v_pool.shape[-1], (1, 1)
        pools = (layer.k_pool, layer.v_pool, None, None, None, None)
        quant = (0, False, 1, 1)
    if unserved(query.shape[1] // h_kv, query.shape[-1], dv, groups):
        return paged_attention(query, layer, scaling, want_probs, softcap, sinks)
    out, probs = torch.ops.kvpolicy.paged_decode_attention(
        query,
        *pools,
        layer.block_table,
        layer.lengths,
        h_kv,
        layer.block_size,
        float(scaling),
        want_probs,
        None if softcap is None else float(softcap),
        sinks,
        splits,
        dv,
        *quant,
        *kivi,
    )
    return out, (probs if want_probs else None)


def split_constexprs(
    p: Plan,
    blk: int,
    softcap: bool,
    want_scores: bool,
    interpret: bool,
    quant: tuple[int, bool, int, int] = (0, False, 1, 1),
    dtype: torch.dtype | None = None,
    kivi: bool = False,
) -> dict[str, Any]:
    """The split kernel's compile-time arguments for plan ``p`` (shared with ``kvpolicy bench kernel``,
    which compiles exactly what a decode step launches); ``quant``: bits (0: stored as is), fp8, and the
    key and value scale groups of a quantized cache, and ``dtype`` the model's (default: the operands')."""
    import triton.language

    return {
        "BLK": blk,
        "TILE": p.tile,
        "TILE_P": p.tile_p,
        "NREP_P": p.nrep_p,
        "D_P": p.d_p,
        "DV_P": p.dv_p,
        "SOFTCAP": softcap,
        "WANT_SCORES": want_scores,
        "OP": getattr(triton.language, p.operand),
        "PREC": p.precision,
        "STAGES": p.num_stages,
        "INTERPRET": interpret,
        "QBITS": quant[0],
        "FP8": quant[1],
        "GROUP_K": quant[2],
        "GROUP_V": quant[3],
        "KIVI": kivi,
        "DT": getattr(triton.language, str(dtype).removeprefix("torch."))
        if dtype
        else getattr(triton.language, p.operand),
    }


def merge_constexprs(p: Plan, splits: int, has_sinks: bool) -> dict[str, Any]:
    """The merge kernel's compile-time arguments (one variant per power-of-two bucket of splits)."""
    splits_p = _next_power_of_2(splits)
    return {"SPLITS_P": splits_p, "BV": merge_chunk(splits_p, p.dv_p), "HAS_SINKS": has_sinks}


@torch.library.custom_op("kvpolicy::paged_decode_attention", mutates_args=())
def _paged_decode_op(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    v_zero: torch.Tensor | None,
    table: torch.Tensor,
    lengths: torch.Tensor,
    h_kv: int,
    blk: int,
    scaling: float,
    want_probs: bool,
    softcap: float | None,
    sinks: torch.Tensor | None,
    splits: int | None,
    dv: int,
    qbits: int,
    fp8: bool,
    group_k: int,
    group_v: int,
    k_rec: torch.Tensor | None,
    res_k: torch.Tensor | None,
    res_v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches as one opaque torch operator: ``torch.compile`` (``fullgraph``) and the traced
    CPU stand-in for CUDA graphs (:mod:`kvpolicy.graphs`) see one node instead of Triton's launcher.
    Returns ``probs`` empty when not wanted (an operator returns tensors only). With ``qbits`` (8, 4, 2)
    the pools are codes and ``*_scale``/``*_zero`` their float16 scales (:mod:`kvpolicy.storage`); with
    ``k_rec`` KIVI's layout (:class:`kvpolicy.quant.KiviLayer`): ``k_scale``/``k_zero`` are its key records,
    ``k_rec`` each slot's record or residual position, ``res_k``/``res_v`` the rows' residuals."""
    interpret = query.device.type != "cuda"
    split_kernel, merge_kernel = _kernels(interpret)
    b, h_q, _, d = query.shape
    rows, n_rep = lengths.numel(), h_q // h_kv
    width = table.shape[1]
    p = plan(n_rep, d, dv, blk, query.dtype if qbits else k_pool.dtype, interpret)
    quant = (qbits, fp8, group_k, group_v)
    # integers carry a zero point; fp8 and unquantized pools pass stand-in pointers the kernel never reads
    ks, vs = (k_scale, v_scale) if qbits else (k_pool, v_pool)
    kz = k_zero if k_zero is not None else ks
    vz = v_zero if v_zero is not None else vs
    scale_strides = (*ks.stride()[:2], *vs.stride()[:2]) if qbits else (0, 0, 0, 0)
    kivi = k_rec is not None
    # KIVI's slot records and residuals; stand-ins (never read) otherwise
    rec, rk, rv = (k_rec, res_k, res_v) if kivi else (k_pool, k_pool, k_pool)
    res_strides = (*rk.stride()[:2], *rv.stride()[:2]) if kivi else (0, 0, 0, 0)  # type: ignore[union-attr]
    per_page = blk // p.tile

    q = query.reshape(rows, n_rep, d)
    lengths = lengths.reshape(-1)
    slots = width * blk
    # buffers first: the split count only sizes `part` and `lse`, which the occupancy probe never reads
    row_lse = torch.empty((rows, n_rep), dtype=torch.float32, device=query.device)
    out = torch.empty((rows, n_rep, dv), dtype=query.dtype, device=query.device)
    scores = (
        torch.empty((rows, n_rep, slots), dtype=torch.float32, device=query.device) if want_probs else row_lse
    )
    constexprs = split_constexprs(
        p, blk, softcap is not None, want_probs, interpret, quant, query.dtype, kivi
    )
    options = (
        {}
        if interpret
        else {"num_warps": p.num_warps, "num_stages": p.num_stages, "enable_fp_fusion": FP_FUSION}
    )

    def split_args(part: torch.Tensor, lse: torch.Tensor, tiles_per_split: int) -> tuple[Any, ...]:
        return (
            q, k_pool, v_pool, ks, kz, vs, vz, table, lengths, part, lse, scores, rec, rk, rv,
            float(scaling), float(softcap) if softcap is not None else 1.0, *q.stride(), *k_pool.stride(),
            *v_pool.stride(), *scale_strides, *res_strides, *table.stride(), n_rep, d, dv, tiles_per_split,
            slots,
        )  # fmt: skip

    if splits is not None:
        n_split = max(1, min(int(splits), width))
    elif interpret:
        n_split = num_splits(rows, width, query.device)
    else:
        key = (query.device, p, k_pool.dtype, softcap is not None, want_probs, quant, kivi)
        probe = split_args(row_lse, row_lse, 1)
        n_split = num_splits(
            rows, width, query.device, _programs_per_sm(key, split_kernel, probe, {**constexprs, **options})
        )
    tiles_per_split = math.ceil(width / n_split) * per_page
    part = torch.empty((rows, n_split, n_rep, dv), dtype=torch.float32, device=query.device)
    lse = torch.empty((rows, n_split, n_rep), dtype=torch.float32, device=query.device)
    split_kernel[(rows, n_split)](*split_args(part, lse, tiles_per_split), **constexprs, **options)
    merge = merge_constexprs(p, n_split, sinks is not None)
    merge_kernel[(rows, n_rep, math.ceil(dv / merge["BV"]))](
        part,
        lse,
        sinks.contiguous() if sinks is not None else lse,
        out,
        row_lse,
        n_rep,
        dv,
        h_kv,
        n_split,
        *out.stride(),
        **merge,
        **({} if interpret else {"num_warps": MERGE_WARPS, "num_stages": 1, "enable_fp_fusion": FP_FUSION}),
    )
    probs = query.new_empty((0,), dtype=torch.float32)
    if want_probs:
        kept = torch.arange(slots, device=query.device) < lengths[:, None, None]  # (R, 1, slots)
        probs = torch.where(kept, torch.exp(scores - row_lse[:, :, None]), 0.0)
        probs = probs.view(b, h_kv, n_rep, slots)
    return out.reshape(b, 1, h_q * dv), probs


@_paged_decode_op.register_fake
def _(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes only (``torch.compile`` tracing): the operator's other arguments are ``k_scale, k_zero,
    v_scale, v_zero, table, lengths, h_kv, blk, scaling, want_probs, softcap, sinks, splits, dv, ...``."""
    table = args[4]
    _lengths, h_kv, blk, _scaling, want_probs = args[5:10]
    dv = args[13]
    b, h_q = query.shape[0], query.shape[1]
    out = query.new_empty((b, 1, h_q * dv))
    slots = table.shape[1] * blk
    shape = (b, h_kv, h_q // h_kv, slots) if want_probs else (0,)
    return out, query.new_empty(shape, dtype=torch.float32)
