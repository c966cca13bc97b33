"""Physical limits of the machine the bench runs on, measured by the bench itself in the same run.

The cost model (:mod:`kvpolicy.bench.costmodel`) counts work: prefill FLOPs, decode bytes. Ratios of
those give speed-up bounds, but say nothing about how close a run comes to the hardware. Dividing the
work by what this machine can do (streaming read bandwidth, matmul FLOP/s) gives absolute bounds in
seconds; measuring the limits here, rather than quoting a datasheet, keeps them honest for the same
threads, dtype, allocator and load the benchmark itself sees.

Three micro-benchmarks, each a median of a few timed repeats after a warm-up, about a second in all on
a CPU:

* streaming read: ``x.sum()`` over a large fp32 tensor (the memory traffic a decode step would need
  if reading were all it did);
* matmul: a square matmul in the model dtype (the best a prefill projection can reach);
* GEMV: a ``(1, hidden)`` vector times a weight matrix in the model dtype, laid out as ``nn.Linear``
  stores it (what a decode step's weight reads actually reach; on CPUs far below streaming read).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Streaming-read tensor size: well beyond any cache level, small enough to allocate anywhere.
READ_BYTES = {"cpu": 512 * 2**20, "cuda": 2 * 2**30}
#: GEMV weight size (a few hundred MB, like a large layer's weights).
GEMV_BYTES = {"cpu": 256 * 2**20, "cuda": 512 * 2**20}
#: Square matmul sizes tried in turn, up to the last (2048 on a CPU, 8192 on CUDA).
MATMUL_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (1024, 2048, 4096, 8192)}
#: GEMV input width (a typical hidden size).
GEMV_HIDDEN = 4096
#: Stop growing a matmul or GEMV once one call takes this long (bf16/fp16 matmuls on a CPU without
#: native support run at ~1 GFLOP/s: a 2048 matmul would take a minute).
GROW_LIMIT_S = 0.15
#: Calls per timing on CUDA (a 2 GiB read takes under a millisecond on a current GPU).
CUDA_INNER = 10


@dataclass(frozen=True)
class Machine:
    """What the machine reached in each micro-benchmark (rates in bytes/s and FLOP/s)."""

    device: str
    dtype: str
    read_bytes_per_s: float
    matmul_flops_per_s: float
    gemv_bytes_per_s: float
    read_bytes: int
    matmul_size: int
    gemv_bytes: int
    seconds: float  # wall time of the whole measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call of ``fn``; on CUDA over :data:`CUDA_INNER` back-to-back calls, so that the
    synchronisation (tens of microseconds) stays small beside sub-millisecond kernels."""
    inner = CUDA_INNER if device.type == "cuda" else 1
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones (first-call costs: page
    faults, kernel selection, lazy CUDA initialisation)."""
    for _ in range(warmup):
        _time(fn, device)
    return statistics.median(_time(fn, device) for _ in range(max(1, repeats)))


def measure_read_bandwidth(device: torch.device, nbytes: int, repeats: int = 3) -> float:
    """Streaming read bandwidth in bytes/s: ``x.sum()`` over an ``nbytes`` fp32 tensor.

    fp32 because its sum vectorises everywhere (a bf16 sum on a CPU converts element by element and
    measures the conversion, not the memory); bytes are bytes whatever the model dtype."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    seconds = _median_time(x.sum, device, repeats)
    return x.numel() * 4 / seconds


def _grow(
    make: Callable[[int], Callable[[], object]], sizes: Sequence[int], device: torch.device
) -> tuple[int, Callable[[], object]]:
    """The largest of ``sizes`` whose single call stays under :data:`GROW_LIMIT_S` (or the first
    size that exceeds it): slow dtypes stop small, fast ones reach the full size. The timed calls
    double as the warm-up; a call over the limit is timed again before stopping, so one-off costs
    of a first call (cuBLAS initialisation, page faults) do not stop the growth."""
    for n in sizes:
        fn = make(n)
        if _time(fn, device) > GROW_LIMIT_S and _time(fn, device) > GROW_LIMIT_S:
            break
    return n, fn


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int = 3
) -> tuple[float, int]:
    """Peak matmul FLOP/s in ``dtype`` (``2 n^3`` per ``n x n`` product) and the ``n`` it reached."""

    def make(n: int) -> Callable[[], object]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return lambda: a @ b

    n, fn = _grow(make, sizes, device)
    return 2.0 * n**3 / _median_time(fn, device, repeats, warmup=0), n


def measure_gemv_bandwidth(
    device: torch.device, dtype: torch.dtype, nbytes: int, hidden: int = GEMV_HIDDEN, repeats: int = 3
) -> tuple[float, int]:
    """GEMV bandwidth in bytes/s: ``F.linear`` of a ``(1, hidden)`` vector with an ``(out, hidden)``
    weight of about ``nbytes`` in ``dtype`` (a decode step's ``(1 x hidden) @ (hidden x out)``, with
    the weight laid out as ``nn.Linear`` keeps it). Returns the rate and the weight bytes used."""
    elem = torch.empty((), dtype=dtype).element_size()
    full = max(1, nbytes // (hidden * elem))
    sizes = sorted({max(1, full // 16), max(1, full // 4), full})
    x = torch.randn(1, hidden, device=device).to(dtype)

    def make(rows: int) -> Callable[[], object]:
        w = torch.full((rows, hidden), 0.5, dtype=dtype, device=device)
        return lambda: torch.nn.functional.linear(x, w)

    rows, fn = _grow(make, sizes, device)
    return rows * hidden * elem / _median_time(fn, device, repeats, warmup=0), rows * hidden * elem


@torch.no_grad()
def measure_machine(
    device: torch.device | str,
    dtype: torch.dtype,
    read_bytes: int | None = None,
    gemv_bytes: int | None = None,
    matmul_sizes: Sequence[int] | None = None,
    repeats: int = 3,
) -> Machine:
    """Measure streaming read bandwidth, peak matmul FLOP/s and GEMV bandwidth on ``device``.

    Sizes default by device type (:data:`READ_BYTES`, :data:`MATMUL_SIZES`, :data:`GEMV_BYTES`);
    pass smaller ones for a quick check. Under ~3 s on a CPU; the tensors are freed on return."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    read_bytes = READ_BYTES[kind] if read_bytes is None else read_bytes
    gemv_bytes = GEMV_BYTES[kind] if gemv_bytes is None else gemv_bytes
    t0 = time.perf_counter()
    read = measure_read_bandwidth(device, read_bytes, repeats)
    flops, n = measure_matmul_flops(device, dtype, matmul_sizes or MATMUL_SIZES[kind], repeats)
    gemv, gemv_used = measure_gemv_bandwidth(device, dtype, gemv_bytes, repeats=repeats)
    return Machine(
        device=str(device),
        dtype=str(dtype),
        read_bytes_per_s=read,
        matmul_flops_per_s=flops,
        gemv_bytes_per_s=gemv,
        read_bytes=(read_bytes // 4) * 4,
        matmul_size=n,
        gemv_bytes=gemv_used,
        seconds=time.perf_counter() - t0,
    )
