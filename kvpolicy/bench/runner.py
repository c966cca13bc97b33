"""Latency and memory benchmarks: each policy against full KV, measured side by side in one run.

For every length, repeats are interleaved across the variants (full KV through kvpolicy, plain
transformers with ``DynamicCache``, optionally plain transformers with ``StaticCache`` and a compiled
decode forward, then each policy), so machine drift hits all of them alike and the ratios cancel it.
Prefill and decode are timed separately (the reference's "throughput" mixed them). Inputs are real
text (the needle haystack), so selections are data-dependent as in use; on a random-weight model
(``--random-weights``) they are seeded random token ids, so no tokenizer is needed.

Beside the ratios each row carries absolute figures against the machine's own limits, measured in the
same run (:func:`kvpolicy.bench.machine.measure_machine`): the decode time the cost model's bytes
would take at the streaming read bandwidth, the prefill FLOP/s reached against the matmul peak, and
the least memory the prefill needs (:func:`~kvpolicy.bench.costmodel.prefill_peak_bytes`).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpolicy import generation
from kvpolicy.bench.costmodel import (
    ModelShape,
    decode_bytes_per_token,
    kv_element_bytes,
    kv_residual_bytes,
    prefill_flops,
    prefill_peak_bytes,
    speedup_bound,
)
from kvpolicy.bench.machine import Machine, measure_machine
from kvpolicy.generation import (
    Prefill,
    _decode,
    _prefill,
    _Sampler,
    cache_keyword,
)
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy

HF_BASELINE = "transformers (DynamicCache)"
HF_COMPILED = "transformers (StaticCache + compile)"
FULL = "fullkv"
#: Suffix of the rows ``also_eager`` adds: the eager decode step timed from the same prefill.
EAGER = " (eager)"


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
    eager: Sample | None = None  # the eager decode from the same prefill (``also_eager``)
    warm_s: float | None = None  # the untimed warm steps before the timed decode (compile, record)
    graphs: str | None = None  # whether recorded graphs replayed (graph_note)


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
    warm_s: float | None = None  # median seconds of the untimed warm steps (compiling, recording graphs)
    graphs: str | None = None  # whether recorded graphs replayed, from the last repeat (graph_note)


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

    def reset_peak(self) -> None:
        """Restart the peak from what is held now (the base stays): a later :meth:`peak` is the
        growth above the base reached since this call."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.base >= 0:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.base = -1

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.base < 0:
            return None
        return max(0, _vm("VmHWM") - self.base)


def _release(device: torch.device) -> None:
    """Give the device the memory of the runs just finished (a later, longer stage may need all of it).

    Their batches (KV pools, recorded graphs' private memory) are already freed when a run returns:
    nothing here keeps a batch past its run, and a batch is in no reference cycle, so no garbage
    collection is needed. On CUDA the caching allocator still holds the freed blocks; this returns them
    (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def decode_step(adapter: Any, compile: bool = False, graphs: bool = False) -> Any:
    """The decode step :func:`kvpolicy.generate` would use: eager, ``torch.compile``-d, or replayed
    from recorded graphs (:func:`kvpolicy.generation.decode_step_fn`)."""
    return generation.decode_step_fn(adapter, compile=compile, graphs=graphs)


def graph_note(batch: Any, compile: bool = False, graphs: bool = False) -> str | None:
    """Whether the fast decode path really replayed graphs in a run, in words (a run where it silently
    did not must say so): the graph path's own counters, or inductor's logged CUDA-graph skips."""
    if graphs:
        g = batch.graphs
        where = "CUDA graphs" if batch.next_positions.device.type == "cuda" else "traced stand-in (no CUDA)"
        if g is None or not g.replays:
            return f"{where}: NOT replayed (every step ran eagerly)"
        total = g.replays + g.recordings + g.eager_steps
        return (
            f"{where}: {g.replays} of {total} steps replayed ({g.recordings} recorded, {g.eager_steps} eager)"
        )
    if compile and batch.next_positions.device.type == "cuda":
        skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
        if skips:
            return "inductor's CUDA graphs: NOT replayed (skipped: mutated inputs)"
        return "inductor's CUDA graphs: no skip logged"
    return None


def warm_steps(compile: bool = False, graphs: bool = False) -> int:
    """Decode steps run untimed before the timed ones: on the graph path the first step of a batch runs
    eagerly and the second records the graph (2); a compiled step may compile a new shape on its first
    call (1); eager steps have nothing to warm (0). A served batch pays these once over its whole
    generation; in a short timed run they would dominate."""
    return 2 if graphs else 1 if compile else 0


@torch.no_grad()
def timed_decode(
    pre: Prefill, policy: Policy, step_fn: Any, gen: int, warm: int = 0
) -> tuple[float, int, list[list[int]], float]:
    """``gen`` greedy decode steps from ``pre`` through the engine's own loop
    (:func:`kvpolicy.generation._decode`, timers around it, no copy of it). Returns seconds per timed
    step, the steps timed, each sequence's ``gen + 1`` tokens (the first from the prefill logits) and
    the seconds of the ``warm`` steps (:func:`warm_steps`) run before the timed loop (at most
    ``gen - 1``: one step is always timed)."""
    sampler = _Sampler(False, 1.0, 1.0, None)
    first: list[list[int]] = [[] for _ in range(pre.batch.size)]
    start = max(0, min(warm, gen - 1))
    device = pre.logits.device
    _sync(device)
    t0 = time.perf_counter()
    logits = pre.logits
    for step in range(start):  # each warm step: the greedy token, then the step (as the loop does)
        token = sampler(logits)
        for row, value in zip(first, token[:, 0].tolist(), strict=True):
            row.append(value)
        logits = step_fn(token, policy, pre.batch, step)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if start:
        pre = Prefill(logits=logits, batch=pre.batch, seconds=pre.seconds)
    tokens, stats = _decode(pre, policy, step_fn, sampler, gen + 1 - start, set(), first_step=start)
    steps = stats[0].decode_steps
    seconds = stats[0].decode_seconds / steps if steps else 0.0
    return seconds, steps, [head + row for head, row in zip(first, tokens, strict=True)], warm_s


@torch.no_grad()
def run_policy(
    model: nn.Module,
    input_ids: torch.Tensor,
    policy: Policy,
    gen: int,
    compile: bool = False,
    graphs: bool = False,
    also_eager: bool = False,
) -> Sample:
    """Prefill under ``policy`` and ``gen`` greedy decode steps, timed separately, through the same
    engine and decode loop as :func:`kvpolicy.generate` (timers around it, no copy of the loop). A
    ``(B, L)`` tensor is a batch (KV bytes are the batch's).

    ``also_eager`` (with ``compile`` or ``graphs``): also time the eager decode step from the same
    prefill, on a copy of its batch, as ``Sample.eager``: the fast path's gain over eager without a
    second prefill (at 128K a prefill of an 8B model takes seconds; its decode steps milliseconds). The
    copy and its decode happen between the prefill and the fast decode, outside the measured peak."""
    device = input_ids.device
    adapter = get_adapter(model)
    fast = compile or graphs
    step_fn = decode_step(adapter, compile, graphs)  # before the prefill: a missing path fails fast
    eager = None
    with _PeakMemory(device) as mem:
        pre = _prefill(adapter, list(input_ids), policy, reserve=gen)
        cache = pre.cache
        kv_bytes = sum(sum(cache.kv_bytes_of(b)) for b in range(len(pre.states)))
        kv_lengths = cache.kv_lengths_of(0)  # after prefill, before decode appends
        prefill_peak = mem.peak()
        decode = tokens = warm_s = None
        if gen and also_eager and fast:
            twin = Prefill(logits=pre.logits, batch=copy.deepcopy(pre.batch), seconds=pre.seconds)
            eager = timed_decode(twin, policy, adapter.decode_step, gen)
            del twin
            mem.reset_peak()
        if gen:
            # gen + 1 tokens: the first comes from the prefill logits, then `gen` decode steps
            decode, _, tokens, warm_s = timed_decode(pre, policy, step_fn, gen, warm_steps(compile, graphs))
        peak = mem.peak()
    note = graph_note(pre.batch, compile, graphs) if gen else None
    # Every layer pass counts for the cost model, a discarded filter pass (GemFilter) included.
    state = pre.state
    passes = [*state.discarded_tokens_per_layer, *state.tokens_per_layer]
    if peak is not None and prefill_peak is not None:
        peak = max(peak, prefill_peak)
    sample = Sample(
        pre.seconds, decode, peak, kv_bytes, passes, kv_lengths, tokens, warm_s=warm_s, graphs=note
    )
    if eager is not None:
        sample.eager = Sample(pre.seconds, eager[0], None, kv_bytes, passes, kv_lengths, eager[2])
    return sample


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
    graphs: bool = False,
    also_eager: bool = False,
    on_sample: Callable[[int, str, int, Sample], None] | None = None,
    on_length: Callable[[int, list[Row]], None] | None = None,
) -> list[Row]:
    """Time every policy against full KV at every length; repeats interleaved across variants.

    ``inputs`` maps a length label to ``(B, L)`` token ids (one prompt repeated ``B`` times);
    ``policies`` maps labels to policies (full KV is always added as the reference).
    ``include_transformers_compiled`` adds plain transformers with ``StaticCache`` and a compiled
    decode forward (compiling takes minutes on a CPU with inductor). ``machine`` holds the limits the
    absolute figures use; measured here (about a second on a CPU) when not given.

    ``compile`` / ``graphs`` choose kvpolicy's decode step (:func:`decode_step`); ``also_eager`` (with
    one of them) adds a ``NAME (eager)`` row per kvpolicy variant, the eager step timed from the same
    prefill (:func:`run_policy`), compared with ``fullkv (eager)``. ``on_sample(length, variant, rep,
    sample)`` sees every run as it finishes (warm-ups have ``rep < 0``) and ``on_length(length, rows)``
    every length's rows, so a run cut short still reports what it measured.
    """
    eager_too = also_eager and gen > 0 and (compile or graphs)
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
    # the rows reported: each kvpolicy variant followed by its eager twin
    reported: dict[str, Policy | None] = {}
    for name, policy in variants.items():
        reported[name] = policy
        if eager_too and policy is not None:
            reported[name + EAGER] = policy
    rows: list[Row] = []
    for length, ids in inputs.items():
        samples: dict[str, list[Sample]] = {name: [] for name in reported}
        for rep in range(warmup + repeats):
            for name, policy in variants.items():
                if name == HF_BASELINE:
                    sample = run_transformers(model, ids, gen)
                elif name == HF_COMPILED:
                    sample = run_transformers_compiled(model, ids, gen)
                else:
                    assert policy is not None
                    sample = run_policy(
                        model, ids, policy, gen, compile=compile, graphs=graphs, also_eager=eager_too
                    )
                runs = [(name, sample)]
                if sample.eager is not None:
                    runs.append((name + EAGER, sample.eager))
                for label, run in runs:
                    if rep >= warmup:
                        samples[label].append(run)
                    if on_sample is not None:
                        on_sample(length, label, rep - warmup, run)
                if progress is not None:
                    progress()
        _release(ids.device)  # before the next length: its runs start from an empty device
        batch = int(ids.shape[0])
        full = _summarise(FULL, length, variants[FULL], samples[FULL], gen)
        full_eager = None
        if eager_too:
            full_eager = _summarise(FULL + EAGER, length, variants[FULL], samples[FULL + EAGER], gen)
        these: list[Row] = []
        for name, policy in reported.items():
            if name == FULL:
                row = full
            elif name == FULL + EAGER and full_eager is not None:
                row = full_eager
            else:
                row = _summarise(name, length, policy, samples[name], gen)
            row.batch = batch
            ref = full_eager if name.endswith(EAGER) and full_eager is not None else full
            _compare(row, ref, shape, elem, gen)
            if machine is not None:
                _absolute(row, shape, elem, gen, machine, int(ids.shape[1]))
            these.append(row)
        rows += these
        if on_length is not None:
            on_length(length, these)
    return rows


def is_reference(variant: str) -> bool:
    """Whether a row is a reference (full KV, its eager twin, a transformers baseline), shown
    without a bound."""
    return variant in (FULL, FULL + EAGER, HF_BASELINE, HF_COMPILED)


def _summarise(name: str, length: int, policy: Policy | None, samples: list[Sample], gen: int) -> Row:
    prefill_s = _stats([s.prefill_s for s in samples])
    decode = e2e = None
    if gen:
        decode = _stats([1000 * (s.decode_s_per_token or 0.0) for s in samples])
        e2e = _stats([s.prefill_s + gen * (s.decode_s_per_token or 0.0) for s in samples])
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    warms = [s.warm_s for s in samples if s.warm_s]
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
        warm_s=statistics.median(warms) if warms else None,
        graphs=last.graphs,
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
        kv_element_bytes(row.config, shape, elem),
        kv_residual_bytes(row.config, shape, elem),
    )
    row.bound = {"prefill": bound.prefill_speedup, "decode": bound.decode_speedup}


def decode_bound_ms(
    shape: ModelShape,
    kv_tokens_per_layer: list[int],
    bytes_per_elem: int,
    generated: int,
    batch: int,
    bytes_per_s: float,
    kv_bytes_per_elem: float | None = None,
    kv_fixed_bytes: float = 0,
) -> float:
    """Milliseconds one decode step of the batch takes at the least: the cost model's bytes (weights
    once, every sequence's KV, ``kv_bytes_per_elem`` per element when quantized, ``kv_fixed_bytes`` per
    sequence) at ``bytes_per_s``."""
    nbytes = decode_bytes_per_token(
        shape, kv_tokens_per_layer, bytes_per_elem, generated, batch, kv_bytes_per_elem, kv_fixed_bytes
    )
    return 1000.0 * nbytes / bytes_per_s


def _absolute(row: Row, shape: ModelShape, elem: int, gen: int, machine: Machine, length: int) -> None:
    """The row's absolute figures against ``machine``: decode bound (streaming read and GEMV
    bandwidth) and the share of it reached, prefill TFLOP/s and its share of the matmul peak, and the
    prefill peak-memory bound without weights (the measured peak excludes them too; the KV counted is
    kept + generated, since the cache reserves room for the decode tokens from the prefill on)."""
    if gen and row.decode_ms_per_token:
        args = (shape, row.kv_tokens_per_layer, elem, gen, row.batch)
        kv = (kv_element_bytes(row.config, shape, elem), kv_residual_bytes(row.config, shape, elem))
        row.decode_bound_ms = decode_bound_ms(*args, machine.read_bytes_per_s, *kv)
        row.decode_gemv_bound_ms = decode_bound_ms(*args, machine.gemv_bytes_per_s, *kv)
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
