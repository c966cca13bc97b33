"""Latency and memory benchmarks: each policy against full KV, measured side by side in one run.

For every length, repeats are interleaved across the variants (full KV through kvpolicy, plain
transformers with ``DynamicCache``, then each policy), so machine drift hits all of them alike and
the ratios cancel it. Prefill and decode are timed separately (the reference's "throughput" mixed
them). Inputs are real text (the needle haystack), so selections are data-dependent as in use.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpolicy.bench.costmodel import ModelShape, speedup_bound
from kvpolicy.generation import _decode, _prefill, _Sampler, cache_keyword, compiled_decode_step
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy

HF_BASELINE = "transformers (DynamicCache)"
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
        decode = None
        if gen:
            # gen + 1 tokens: the first comes from the prefill logits, then `gen` decode steps
            _, stats = _decode(pre, policy, step_fn, _Sampler(False, 1.0, 1.0, None), gen + 1, set())
            decode = stats[0].decode_seconds_per_token
    # Every layer pass counts for the cost model, a discarded filter pass (GemFilter) included.
    state = pre.state
    passes = [*state.discarded_tokens_per_layer, *state.tokens_per_layer]
    return Sample(pre.seconds, decode, mem.peak(), kv_bytes, passes, kv_lengths)


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
        decode = None
        if gen:
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            position = input_ids.shape[1]
            t0 = time.perf_counter()
            for step in range(gen):
                pos = torch.tensor([[position + step]], device=device)
                out = model(input_ids=token, position_ids=pos, use_cache=True, **{key: cache})
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            _sync(device)
            decode = (time.perf_counter() - t0) / gen
    n_layers = model.config.num_hidden_layers
    length = input_ids.shape[1]
    return Sample(prefill_s, decode, mem.peak(), int(kv), [length] * n_layers, [length] * n_layers)


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
) -> list[Row]:
    """Time every policy against full KV at every length; repeats interleaved across variants.

    ``inputs`` maps a length label to ``(1, L)`` token ids; ``policies`` maps labels to policies
    (full KV is always added as the reference).
    """
    variants: dict[str, Policy | None] = {FULL: get_policy("fullkv")}
    if include_transformers:
        variants[HF_BASELINE] = None
    variants.update({k: v for k, v in policies.items() if k != FULL})
    shape = ModelShape.from_config(model.config)
    elem = next(model.parameters()).element_size()
    rows: list[Row] = []
    for length, ids in inputs.items():
        samples: dict[str, list[Sample]] = {name: [] for name in variants}
        for rep in range(warmup + repeats):
            for name, policy in variants.items():
                sample = (
                    run_transformers(model, ids, gen)
                    if policy is None
                    else run_policy(model, ids, policy, gen, compile=compile)
                )
                if rep >= warmup:
                    samples[name].append(sample)
                if progress is not None:
                    progress()
        full = _summarise(FULL, length, variants[FULL], samples[FULL], gen)
        for name, policy in variants.items():
            row = full if name == FULL else _summarise(name, length, policy, samples[name], gen)
            _compare(row, full, shape, elem, gen)
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
    )
    row.bound = {"prefill": bound.prefill_speedup, "decode": bound.decode_speedup}


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
