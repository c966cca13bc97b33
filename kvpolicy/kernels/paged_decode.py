"""Split-K (flash-decoding) decode attention over kvpolicy's paged, ragged cache, in Triton.

Same contract as :func:`kvpolicy.cache.paged_attention` (see :func:`paged_decode_attention`), without
the torch path's costs: it gathers the queries per page, reads every allocated page (reserve, empty tail,
freed slots), accumulates partial outputs in the pool's dtype and merges pages with contended atomics
(about 1.6x the minimum traffic in some 26 kernels at 128K tokens). Here:

* **Kernel 1**, grid ``(R, SPLITS)`` over rows ``R = B * H_kv`` (one ``(sequence, KV head)`` each) and
  splits of the row's pages. A program loads its row's ``n_rep`` queries once, walks its pages through
  the block table in tiles of ``TILE`` slots, reads only tiles holding slots ``< length`` (a row's
  entries always sit in slots ``0..length-1``, so cost follows kept entries, not allocated pages) and
  keeps an online softmax (running max and sum, fp32). It writes its normalised partial output and
  log-sum-exp per query head, and with ``want_probs`` each kept slot's (soft-capped) scaled score.
* **Kernel 2** (merge), grid ``R``: the exact log-sum-exp merge of the splits in fp32, the sinks'
  share in the denominator, the output in the query's dtype, and each query head's total log-sum-exp
  (so probabilities are ``exp(score - lse)``).

The number of splits depends only on static facts (rows, block-table width, the device's SM count), never
on ``lengths``: a decode step reads nothing back and keeps static shapes, so it can be captured in a CUDA
graph. Triton is imported on first use; ``kvpolicy.kernels.available()`` says whether it can run.
"""

from __future__ import annotations

import math
import os
import types
from typing import Any

import torch

from kvpolicy.cache import PagedLayer

#: Stands for ``triton.language`` in the kernels' source. Triton is optional, so the functions below stay
#: plain (never called) here; :func:`_kernels` runs copies of them with ``tl`` bound to Triton's.
tl: Any = None

#: largest ``n_rep * TILE * d`` product held in registers per tile on a GPU (about 64 fp32 per thread
#: at 4 warps): decode is memory bound, so small tiles cost little and keep the kernel from spilling.
_REGISTER_ELEMENTS = 8192


def _add(a, b):
    return a + b


def _max(a, b):
    return tl.maximum(a, b)


# Only builtins of ``tl`` and this module's functions are used in the kernels (``tl.full``, not
# ``tl.zeros``; ``tl.reduce`` with ``_add``/``_max``, not ``tl.sum``/``tl.max``): Triton's standard-library
# functions were wrapped when Triton was imported, for the interpreter only if ``TRITON_INTERPRET=1`` was
# set before that import. This module's functions are wrapped per mode by ``_kernels``.


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
    table_ptr,
    score_ptr,
    scale,
    cap,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
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
):
    """Fold tile ``t`` (slots ``t * TILE ...``, all in one page: ``TILE`` divides ``BLK``) of row ``row64``
    into the online softmax ``(m_i, l_i) (NREP_P,)``, ``acc (NREP_P, DV_P)`` of the queries ``q (NREP_P, D_P)``."""
    offs_r = tl.arange(0, NREP_P)
    offs_d = tl.arange(0, D_P)
    offs_v = tl.arange(0, DV_P)
    offs_n = tl.arange(0, TILE_P)
    first = t * TILE
    page = tl.load(table_ptr + row64 * stride_tr + (first // BLK) * stride_tc).to(tl.int64)
    within = first % BLK + offs_n
    slot = first + offs_n
    ok = (offs_n < TILE) & (slot < length)
    k = tl.load(
        k_ptr + page * stride_kp + within[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=ok[:, None] & (offs_d[None, :] < d),
        other=0.0,
    ).to(tl.float32)
    # (NREP_P, TILE_P): broadcast multiply and reduce; n_rep is too small for tensor cores to matter
    s = tl.reduce(q[:, None, :] * k[None, :, :], 2, _add) * scale
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
    v = tl.load(
        v_ptr + page * stride_vp + within[:, None] * stride_vs + offs_v[None, :] * stride_vd,
        mask=ok[:, None] & (offs_v[None, :] < dv),
        other=0.0,
    ).to(tl.float32)
    acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * v[None, :, :], 1, _add)
    return m_new, l_i, acc


def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    len_ptr,
    part_ptr,
    lse_ptr,
    score_ptr,
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
    INTERPRET: tl.constexpr,
):
    """One (row, split): partial output ``part[row, split] (NREP_P, DV_P)`` normalised by its own
    softmax sum, and its log-sum-exp ``lse[row, split] (NREP_P,)`` (``-inf`` when it holds no entry)."""
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
    ).to(tl.float32)
    length = tl.load(len_ptr + row64).to(tl.int32)
    # this split's tiles [lo, hi), clipped to the tiles the row uses: slots >= length are never read
    lo = split * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, (length + TILE - 1) // TILE)
    m_i = tl.full([NREP_P], float("-inf"), tl.float32)
    l_i = tl.full([NREP_P], 0.0, tl.float32)
    acc = tl.full([NREP_P, DV_P], 0.0, tl.float32)
    if INTERPRET:
        # Triton 3.6's interpreter cannot range() over runtime scalars under numpy >= 2.4 (they are
        # 1-element arrays); a while loop works there. Compiled, tl.range pipelines the page-number load.
        t = lo
        while t < hi:
            m_i, l_i, acc = _attend_tile(
                q, t, row64, length, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, score_ptr, scale, cap,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, stride_tr, stride_tc,
                n_rep, d, dv, slots, BLK, TILE, TILE_P, NREP_P, D_P, DV_P, SOFTCAP, WANT_SCORES,
            )  # fmt: skip
            t += 1
    else:
        for t in tl.range(lo, hi, num_stages=2):  # prefetches the next tile's page number
            m_i, l_i, acc = _attend_tile(
                q, t, row64, length, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, score_ptr, scale, cap,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, stride_tr, stride_tc,
                n_rep, d, dv, slots, BLK, TILE, TILE_P, NREP_P, D_P, DV_P, SOFTCAP, WANT_SCORES,
            )  # fmt: skip
    held = l_i > 0.0
    safe = tl.where(held, l_i, 1.0)
    lse = tl.where(held, m_i + tl.log(safe), float("-inf"))
    base = (row64 * splits + split) * NREP_P
    tl.store(lse_ptr + base + offs_r, lse)
    tl.store(part_ptr + (base + offs_r[:, None]) * DV_P + offs_v[None, :], acc / safe[:, None])


def _merge_kernel(
    part_ptr,
    lse_ptr,
    sink_ptr,
    out_ptr,
    row_lse_ptr,
    n_rep,
    dv,
    num_heads,
    stride_or,
    stride_on,
    stride_od,
    SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
    NREP_P: tl.constexpr,
    DV_P: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One row: ``out[row] (n_rep, dv)`` = the splits' partials weighted by ``exp(lse_s - lse)``, and the
    row's total log-sum-exp per query head (``row_lse[row] (NREP_P,)``, sinks included)."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P)
    offs_r = tl.arange(0, NREP_P)
    offs_v = tl.arange(0, DV_P)
    r_ok = offs_r < n_rep
    lse = tl.load(
        lse_ptr + (row64 * SPLITS + offs_s[:, None]) * NREP_P + offs_r[None, :],
        mask=offs_s[:, None] < SPLITS,
        other=float("-inf"),
    )
    m = tl.reduce(lse, 0, _max)
    if HAS_SINKS:
        sink = tl.load(sink_ptr + (row % num_heads) * n_rep + offs_r, mask=r_ok, other=float("-inf"))
        sink = sink.to(tl.float32)
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row without entries (and no sink): every weight is 0
    denom = tl.reduce(tl.exp(lse - m[None, :]), 0, _add)
    if HAS_SINKS:
        denom += tl.exp(sink - m)  # the sink's share: in the denominator, no value
    acc = tl.full([NREP_P, DV_P], 0.0, tl.float32)
    for s in range(SPLITS):
        base = (row64 * SPLITS + s) * NREP_P
        w = tl.exp(tl.load(lse_ptr + base + offs_r) - m)
        acc += w[:, None] * tl.load(part_ptr + (base + offs_r[:, None]) * DV_P + offs_v[None, :])
    safe = tl.where(denom > 0.0, denom, 1.0)
    out = acc / safe[:, None]
    tl.store(
        out_ptr + row64 * stride_or + offs_r[:, None] * stride_on + offs_v[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & (offs_v[None, :] < dv),
    )
    tl.store(row_lse_ptr + row64 * NREP_P + offs_r, m + tl.log(safe))


#: ``{interpreted: (split kernel, merge kernel)}`` once built; a plain global (not a cached function) so
#: that ``torch.compile`` tracing a decode step after the first call only reads a constant.
_KERNELS: dict[bool, tuple[Any, Any]] = {}
#: streaming multiprocessors per CUDA device index (a host-side property, read once per device).
_SM_COUNT: dict[int | None, int] = {}
#: resident programs per SM to aim for: a program uses about 128 registers per thread at 4 warps (four
#: fit an SM), and Triton does not software-pipeline loads that feed no ``tl.dot`` (only the block-table
#: load is), so latency is hidden by programs in flight, not by prefetching.
_PROGRAMS_PER_SM = 4


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

        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            wrap = triton.JITFunction
        namespace: dict[str, Any] = {
            "__name__": __name__,
            "__builtins__": __builtins__,
            "tl": triton.language,
        }

        def bind(fn: Any) -> Any:
            clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
            clone.__module__, clone.__qualname__ = fn.__module__, fn.__qualname__
            clone.__annotations__, clone.__doc__ = fn.__annotations__, fn.__doc__
            namespace[fn.__name__] = wrap(clone)
            return namespace[fn.__name__]

        for helper in (_add, _max, _attend_tile):
            bind(helper)
        _KERNELS[interpret] = (bind(_split_kernel), bind(_merge_kernel))
    return _KERNELS[interpret]


def num_splits(rows: int, width: int, device: torch.device) -> int:
    """Splits per row from static facts only (never ``lengths``: that would need a host read and break
    CUDA-graph capture): about :data:`_PROGRAMS_PER_SM` programs per SM on CUDA, two per row elsewhere
    (the interpreter pays per program), never more than the block table's ``width`` (pages per row)."""
    if device.type == "cuda":
        if device.index not in _SM_COUNT:
            _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        target = _PROGRAMS_PER_SM * _SM_COUNT[device.index]
    else:
        target = 2 * rows
    splits = max(1, min(width, math.ceil(target / max(rows, 1))))
    return math.ceil(width / math.ceil(width / splits))  # equal page shares, none of them empty


def _tile(blk: int, n_rep_p: int, d_p: int, interpret: bool) -> tuple[int, int]:
    """Slots per tile (a divisor of ``blk``, so a tile stays in one page) and its power-of-two padding.

    Compiled: the largest power of two up to 32 whose ``(n_rep, TILE, d)`` product fits
    :data:`_REGISTER_ELEMENTS` (ptxas for sm_90, 4 warps: 8192 elements take about 100-130 registers per
    thread without spills; 16384, or 64-slot tiles, take 220-255). Interpreted: whole pages, since every
    tile is a Python-level loop iteration.
    """
    if blk & (blk - 1):  # not a power of two: whole pages, padded
        return blk, _next_power_of_2(blk)
    if interpret:
        return blk, blk
    tile = min(blk, 32)
    while tile > 1 and n_rep_p * tile * d_p > _REGISTER_ELEMENTS:
        tile //= 2
    return tile, tile


def _next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (Triton block shapes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


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
    out, probs = torch.ops.kvpolicy.paged_decode_attention(
        query,
        layer.k_pool,
        layer.v_pool,
        layer.block_table,
        layer.lengths,
        h_kv,
        layer.block_size,
        float(scaling),
        want_probs,
        None if softcap is None else float(softcap),
        sinks,
        splits,
    )
    return out, (probs if want_probs else None)


@torch.library.custom_op("kvpolicy::paged_decode_attention", mutates_args=())
def _paged_decode_op(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    h_kv: int,
    blk: int,
    scaling: float,
    want_probs: bool,
    softcap: float | None,
    sinks: torch.Tensor | None,
    splits: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches as one opaque torch operator: ``torch.compile`` (``fullgraph``) and the traced
    CPU stand-in for CUDA graphs (:mod:`kvpolicy.graphs`) see one node instead of Triton's launcher.
    Returns ``probs`` empty when not wanted (an operator returns tensors only)."""
    interpret = query.device.type != "cuda"
    split_kernel, merge_kernel = _kernels(interpret)
    b, h_q, _, d = query.shape
    rows, n_rep = lengths.numel(), h_q // h_kv
    width, dv = table.shape[1], v_pool.shape[-1]
    n_rep_p = _next_power_of_2(n_rep)
    d_p, dv_p = _next_power_of_2(d), _next_power_of_2(dv)
    tile, tile_p = _tile(blk, n_rep_p, max(d_p, dv_p), interpret)
    n_split = num_splits(rows, width, query.device) if splits is None else max(1, min(int(splits), width))
    tiles_per_split = math.ceil(width / n_split) * (blk // tile)

    q = query.reshape(rows, n_rep, d)
    lengths = lengths.reshape(-1)
    part = torch.empty((rows, n_split, n_rep_p, dv_p), dtype=torch.float32, device=query.device)
    lse = torch.empty((rows, n_split, n_rep_p), dtype=torch.float32, device=query.device)
    row_lse = torch.empty((rows, n_rep_p), dtype=torch.float32, device=query.device)
    out = torch.empty((rows, n_rep, dv), dtype=query.dtype, device=query.device)
    slots = width * blk
    scores = (
        torch.empty((rows, n_rep, slots), dtype=torch.float32, device=query.device) if want_probs else lse
    )
    split_kernel[(rows, n_split)](
        q,
        k_pool,
        v_pool,
        table,
        lengths,
        part,
        lse,
        scores,
        float(scaling),
        float(softcap) if softcap is not None else 1.0,
        *q.stride(),
        *k_pool.stride(),
        *v_pool.stride(),
        *table.stride(),
        n_rep,
        d,
        dv,
        tiles_per_split,
        slots,
        BLK=blk,
        TILE=tile,
        TILE_P=tile_p,
        NREP_P=n_rep_p,
        D_P=d_p,
        DV_P=dv_p,
        SOFTCAP=softcap is not None,
        WANT_SCORES=want_probs,
        INTERPRET=interpret,
    )
    merge_kernel[(rows,)](
        part,
        lse,
        sinks.contiguous() if sinks is not None else lse,
        out,
        row_lse,
        n_rep,
        dv,
        h_kv,
        *out.stride(),
        SPLITS=n_split,
        SPLITS_P=_next_power_of_2(n_split),
        NREP_P=n_rep_p,
        DV_P=dv_p,
        HAS_SINKS=sinks is not None,
    )
    probs = query.new_empty((0,), dtype=torch.float32)
    if want_probs:
        kept = torch.arange(slots, device=query.device) < lengths[:, None, None]  # (R, 1, slots)
        probs = torch.where(kept, torch.exp(scores - row_lse[:, :n_rep, None]), 0.0)
        probs = probs.view(b, h_kv, n_rep, slots)
    return out.reshape(b, 1, h_q * dv), probs


@_paged_decode_op.register_fake
def _(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes only (``torch.compile`` tracing): the operator's other arguments are ``lengths, h_kv, blk,
    scaling, want_probs, ...``."""
    _lengths, h_kv, blk, _scaling, want_probs = args[:5]
    b, h_q = query.shape[0], query.shape[1]
    out = query.new_empty((b, 1, h_q * v_pool.shape[-1]))
    slots = table.shape[1] * blk
    shape = (b, h_kv, h_q // h_kv, slots) if want_probs else (0,)
    return out, query.new_empty(shape, dtype=torch.float32)
