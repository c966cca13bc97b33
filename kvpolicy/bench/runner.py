"""Latency and memory benchmarks: each policy against full KV, measured side by side in one run.

For every length, repeats are interleaved across the variants (full KV through kvpolicy, plain
transformers with ``DynamicCache``, optionally plain transformers with ``StaticCache`` and a compiled
decode forward, then each policy), so machine drift hits all of them alike and the ratios cancel it.
Prefill and decode are timed separately (the reference's "throughput" mixed them). Inputs are real
text (the needle haystack), so selections are data-dependent as in use.

Beside the ratios each row carries absolute figures against the machine's own limits, measured in the
same run (:func:`kvpolicy.bench.machine.measure_machine`): the decode time the cost model's bytes
would take at the streaming read bandwidth, the prefill FLOP/s reached against the matmul peak, and
the least memory the prefill needs (:func:`~kvpolicy.bench.costmodel.prefill_peak_bytes`).
"""

from __future__ import annotations

import platform
import statistics
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpolicy import generation
from kvpolicy.bench.costmodel import (
    ModelShape,
    decode_bytes_per_token,
    prefill_flops,
    prefill_peak_bytes,
    speedup_bound,
)
from kvpolicy.bench.machine import Machine, measure_machine
from kvpolicy.generation import _decode, _prefill, _Sampler, cache_keyword, compiled_decode_step
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy

HF_BASELINE = "transformers (DynamicCache)"
HF_COMPILED = "transformers (StaticCache + compile)"
FULL = "fullkv"


@dataclass
class Sample:
    """One timed run of one variant."""

    prefill_s: float
    decode_s_per_token: float | None
    peak_bytes: int | None
    kv_bytes: int
    tokens_per_layer: list[int]
    kv_tokens_per_layer: list[int]
    tokens: list[list[int]] | None = None  # greedy tokens per sequence (first from the prefill)


@dataclass
class Row:
    """Summary of one (variant, length) over the timed repeats."""

    variant: str
    length: int
    config: dict[str, Any] | None
    prefill_s: dict[str, float]
    decode_ms_per_token: dict[str, float] | None
    e2e_s: dict[str, float] | None
    peak_bytes: int | None
    kv_bytes: int
    tokens_per_layer: list[int]
    kv_tokens_per_layer: list[int]
    speedup: dict[str, float | None] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)
    # Absolute figures against the machine measured in the same run (see _absolute).
    batch: int = 1
    decode_bound_ms: float | None = None  # cost-model decode bytes / streaming read bandwidth
    decode_bound_share: float | None = None  # decode_bound_ms / measured ms per token
    decode_gemv_bound_ms: float | None = None  # the same bytes at the measured GEMV bandwidth
    prefill_tflops: float | None = None  # cost-model prefill FLOPs x batch / measured seconds
    prefill_flops_share: float | None = None  # of the measured matmul peak
    peak_bound_bytes: int | None = None  # costmodel.prefill_peak_bytes without weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of one run: CUDA allocator peak, or on Linux CPU the process's peak RSS (VmHWM),
    reset before the run through ``/proc/self/clear_refs``. ``None`` where neither is available."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.base = _vm("VmRSS")
            except OSError:
                self.base = -1
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.base < 0:
            return None
        return max(0, _vm("VmHWM") - self.base)


def _vm(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(field_name)


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "p25": ordered[0], "p75": ordered[0]}
    q = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2]}


@torch.no_grad()
def run_policy(
    model: nn.Module, input_ids: torch.Tensor, policy: Policy, gen: int, compile: bool = False
) -> Sample:
    """Prefill under ``policy`` and ``gen`` greedy decode steps, timed separately, through the same
    engine and decode loop as :func:`kvpolicy.generate` (timers around it, no copy of the loop). A
    ``(B, L)`` tensor is a batch (KV bytes are the batch's)."""
    device = input_ids.device
    adapter = get_adapter(model)
    step_fn = compiled_decode_step(adapter) if compile else adapter.decode_step
    with _PeakMemory(device) as mem:
        pre = _prefill(adapter, list(input_ids), policy, reserve=gen)
        cache = pre.cache
        kv_bytes = sum(sum(cache.kv_bytes_of(b)) for b in range(len(pre.states)))
        kv_lengths = cache.kv_lengths_of(0)  # after prefill, before decode appends
        decode = tokens = None
        if gen:
            # gen + 1 tokens: the first comes from the prefill logits, then `gen` decode steps
            tokens, stats = _decode(pre, policy, step_fn, _Sampler(False, 1.0, 1.0, None), gen + 1, set())
            decode = stats[0].decode_seconds_per_token
    # Every layer pass counts for the cost model, a discarded filter pass (GemFilter) included.
    state = pre.state
    passes = [*state.discarded_tokens_per_layer, *state.tokens_per_layer]
    return Sample(pre.seconds, decode, mem.peak(), kv_bytes, passes, kv_lengths, tokens)


@torch.no_grad()
def run_transformers(model: nn.Module, input_ids: torch.Tensor, gen: int) -> Sample:
    """The plain model with its own forward and ``DynamicCache``: the framework-overhead baseline."""
    from transformers import DynamicCache

    device = input_ids.device
    with _PeakMemory(device) as mem:
        cache = DynamicCache(config=model.config)
        _sync(device)
        t0 = time.perf_counter()
        key = cache_keyword(model)  # `cache` from transformers 5.24, `past_key_values` before
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{key: cache})
        _sync(device)
        prefill_s = time.perf_counter() - t0
        kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * model.dtype.itemsize
        decode = tokens = None
        if gen:
            decode, tokens = _greedy(model, out.logits, input_ids.shape[1], gen, {key: cache})
    n_layers = model.config.num_hidden_layers
    length = input_ids.shape[1]
    return Sample(prefill_s, decode, mem.peak(), int(kv), [length] * n_layers, [length] * n_layers, tokens)


def _greedy(
    forward: Any, logits: torch.Tensor, start: int, gen: int, cache: dict[str, Any], cudagraphs: bool = False
) -> tuple[float, list[list[int]]]:
    """The plain-transformers baselines' greedy decode loop: ``gen`` steps of ``forward`` (the model,
    or its compiled forward) from the prefill ``logits``; returns seconds per step and the tokens."""
    device = logits.device
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    generated = [token]
    t0 = time.perf_counter()
    for step in range(gen):
        pos = torch.tensor([[start + step]], device=device)
        if cudagraphs:  # the previous step's outputs are consumed: the graph may reuse them
            torch.compiler.cudagraph_mark_step_begin()
        out = forward(input_ids=token, position_ids=pos, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(token)
    _sync(device)
    return (time.perf_counter() - t0) / gen, torch.cat(generated, dim=1).tolist()


#: The StaticCache baseline's compiled forward and kept cache, per model, held beside the model (never
#: on it: the bench leaves the user's model as it found it) and dropped with it.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any]] = weakref.WeakKeyDictionary()
_STATIC: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], Any]] = weakref.WeakKeyDictionary()


def static_compile_options(device: torch.device) -> dict[str, Any]:
    """``torch.compile`` options for the StaticCache baseline: the backend in
    :data:`kvpolicy.generation.COMPILE_BACKEND` if set (tests set ``"eager"``: no inductor), else
    inductor, with CUDA graphs (``mode="reduce-overhead"``) on CUDA as the transformers docs advise."""
    backend = generation.COMPILE_BACKEND
    if backend:
        return {"backend": backend}
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def _compiled_forward(model: nn.Module, options: dict[str, Any]) -> Any:
    """``torch.compile(model.forward, fullgraph=True)``, one per model and options, kept per model
    so that repeats reuse the compiled graphs (the warm-up repeats pay for compiling)."""
    key = tuple(sorted(options.items()))
    cached = _COMPILED.get(model)
    if cached is None or cached[0] != key:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        cached = (key, torch.compile(model.forward, fullgraph=True, **options))
        _COMPILED[model] = cached
    return cached[1]


def _static_cache(model: nn.Module, batch: int, max_len: int, create: bool = False) -> tuple[Any, int]:
    """The model's kept ``StaticCache`` for ``(batch, max_len)``, reset, and the bytes it holds; or
    ``(None, 0)`` where there is none of that shape (``create``: make it and keep it, replacing any
    other, so only one shape's cache is held at a time)."""
    from transformers import StaticCache

    kept = _STATIC.get(model)
    if kept is not None and kept[0] == (batch, max_len):
        cache = kept[1]
        cache.reset()
        layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
        held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in layers)
        return cache, held
    if not create:
        _STATIC.pop(model, None)  # free the other shape's cache before this run
        return None, 0
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    _STATIC[model] = ((batch, max_len), cache)
    return cache, 0


@torch.no_grad()
def run_transformers_compiled(model: nn.Module, input_ids: torch.Tensor, gen: int) -> Sample:
    """The plain model with transformers' ``StaticCache`` and its decode forward under
    ``torch.compile(fullgraph=True)``: the fast path the transformers docs recommend ("Static
    kv-cache and torch.compile"). Prefill runs eagerly (as ``generate`` does: prefill shapes change
    with every prompt), decode compiled; timed like :func:`run_transformers`.

    The cache holds ``length + gen`` positions from the start. As ``generate`` does, one cache per
    shape is kept (per model) and reset between runs, so its addresses stay fixed and CUDA graphs
    recorded in the warm-up replay; a reused cache is allocated before the run, so its bytes are added
    to the measured peak (it is held throughout the run). KV bytes count the prompt's entries, as for
    ``DynamicCache``."""
    device = input_ids.device
    batch, length = input_ids.shape
    options = static_compile_options(device)
    forward = _compiled_forward(model, options)
    cudagraphs = options.get("mode") == "reduce-overhead"
    key = cache_keyword(model)
    cache, held = _static_cache(model, int(batch), length + gen)
    with _PeakMemory(device) as mem:
        cache = cache or _static_cache(model, int(batch), length + gen, create=True)[0]
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{key: cache})
        _sync(device)
        prefill_s = time.perf_counter() - t0
        kv = sum(
            layer.keys[:, :, :length].numel() + layer.values[:, :, :length].numel() for layer in cache.layers
        )
        decode = tokens = None
        if gen:
            decode, tokens = _greedy(forward, out.logits, length, gen, {key: cache}, cudagraphs)
    n_layers = model.config.num_hidden_layers
    peak = mem.peak()
    return Sample(
        prefill_s,
        decode,
        None if peak is None else peak + held,
        int(kv) * model.dtype.itemsize,
        [length] * n_layers,
        [length] * n_layers,
        tokens,
    )


def benchmark(
    model: nn.Module,
    inputs: dict[int, torch.Tensor],
    policies: dict[str, Policy],
    gen: int = 0,
    repeats: int = 5,
    warmup: int = 1,
    include_transformers: bool = True,
    progress: Any = None,
    compile: bool = False,
    include_transformers_compiled: bool = False,
    machine: Machine | None = None,
) -> list[Row]:
    """Time every policy against full KV at every length; repeats interleaved across variants.

    ``inputs`` maps a length label to ``(B, L)`` token ids (one prompt repeated ``B`` times);
    ``policies`` maps labels to policies (full KV is always added as the reference).
    ``include_transformers_compiled`` adds plain transformers with ``StaticCache`` and a compiled
    decode forward (compiling takes minutes on a CPU with inductor). ``machine`` holds the limits the
    absolute figures use; measured here (about a second on a CPU) when not given.
    """
    variants: dict[str, Policy | None] = {FULL: get_policy("fullkv")}
    if include_transformers:
        variants[HF_BASELINE] = None
    if include_transformers_compiled:
        variants[HF_COMPILED] = None
    variants.update({k: v for k, v in policies.items() if k != FULL})
    shape = ModelShape.from_config(model.config)
    param = next(model.parameters())
    elem = param.element_size()
    if machine is None and inputs:
        machine = measure_machine(next(iter(inputs.values())).device, param.dtype)
    rows: list[Row] = []
    for length, ids in inputs.items():
        samples: dict[str, list[Sample]] = {name: [] for name in variants}
        for rep in range(warmup + repeats):
            for name, policy in variants.items():
                if name == HF_BASELINE:
                    sample = run_transformers(model, ids, gen)
                elif name == HF_COMPILED:
                    sample = run_transformers_compiled(model, ids, gen)
                else:
                    assert policy is not None
                    sample = run_policy(model, ids, policy, gen, compile=compile)
                if rep >= warmup:
                    samples[name].append(sample)
                if progress is not None:
                    progress()
        batch = int(ids.shape[0])
        full = _summarise(FULL, length, variants[FULL], samples[FULL], gen)
        for name, policy in variants.items():
            row = full if name == FULL else _summarise(name, length, policy, samples[name], gen)
            row.batch = batch
            _compare(row, full, shape, elem, gen)
            if machine is not None:
                _absolute(row, shape, elem, gen, machine, int(ids.shape[1]))
            rows.append(row)
    return rows


def _summarise(name: str, length: int, policy: Policy | None, samples: list[Sample], gen: int) -> Row:
    prefill_s = _stats([s.prefill_s for s in samples])
    decode = e2e = None
    if gen:
        decode = _stats([1000 * (s.decode_s_per_token or 0.0) for s in samples])
        e2e = _stats([s.prefill_s + gen * (s.decode_s_per_token or 0.0) for s in samples])
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    last = samples[-1]
    return Row(
        variant=name,
        length=length,
        config=None if policy is None else policy.to_dict(),
        prefill_s=prefill_s,
        decode_ms_per_token=decode,
        e2e_s=e2e,
        peak_bytes=int(statistics.median(peaks)) if peaks else None,
        kv_bytes=last.kv_bytes,
        tokens_per_layer=last.tokens_per_layer,
        kv_tokens_per_layer=last.kv_tokens_per_layer,
    )


def _compare(row: Row, full: Row, shape: ModelShape, elem: int, gen: int) -> None:
    row.speedup["prefill"] = full.prefill_s["median"] / row.prefill_s["median"]
    if row.decode_ms_per_token and full.decode_ms_per_token:
        row.speedup["decode"] = full.decode_ms_per_token["median"] / row.decode_ms_per_token["median"]
    if row.e2e_s and full.e2e_s:
        row.speedup["e2e"] = full.e2e_s["median"] / row.e2e_s["median"]
    bound = speedup_bound(
        shape,
        full.tokens_per_layer,
        full.kv_tokens_per_layer,
        row.tokens_per_layer,
        row.kv_tokens_per_layer,
        elem,
        gen,
        row.batch,
    )
    row.bound = {"prefill": bound.prefill_speedup, "decode": bound.decode_speedup}


def decode_bound_ms(
    shape: ModelShape,
    kv_tokens_per_layer: list[int],
    bytes_per_elem: int,
    generated: int,
    batch: int,
    bytes_per_s: float,
) -> float:
    """Milliseconds one decode step of the batch takes at the least: the cost model's bytes (weights
    once, every sequence's KV) at ``bytes_per_s``."""
    nbytes = decode_bytes_per_token(shape, kv_tokens_per_layer, bytes_per_elem, generated, batch)
    return 1000.0 * nbytes / bytes_per_s


def _absolute(row: Row, shape: ModelShape, elem: int, gen: int, machine: Machine, length: int) -> None:
    """The row's absolute figures against ``machine``: decode bound (streaming read and GEMV
    bandwidth) and the share of it reached, prefill TFLOP/s and its share of the matmul peak, and the
    prefill peak-memory bound without weights (the measured peak excludes them too; the KV counted is
    kept + generated, since the cache reserves room for the decode tokens from the prefill on)."""
    if gen and row.decode_ms_per_token:
        args = (shape, row.kv_tokens_per_layer, elem, gen, row.batch)
        row.decode_bound_ms = decode_bound_ms(*args, machine.read_bytes_per_s)
        row.decode_gemv_bound_ms = decode_bound_ms(*args, machine.gemv_bytes_per_s)
        row.decode_bound_share = row.decode_bound_ms / row.decode_ms_per_token["median"]
    flops_per_s = prefill_flops(shape, row.tokens_per_layer) * row.batch / row.prefill_s["median"]
    row.prefill_tflops = flops_per_s / 1e12
    row.prefill_flops_share = flops_per_s / machine.matmul_flops_per_s
    kept = [k + gen for k in row.kv_tokens_per_layer]
    row.peak_bound_bytes = prefill_peak_bytes(shape, length, row.batch, elem, kept, include_weights=False)


def machine_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
