"""Throughput at batch (``kvpolicy bench e2e --throughput``): generated tokens per second of a whole
decode batch, per policy and prompt length, at given batch sizes and at the largest batch that fits.

Why: the serving value of a compressed cache is more sequences per device. At batch 1 a decode step
of a large model mostly reads weights, so a 10 % cache barely shows; at the largest batch that fits,
full KV is bounded by its KV (few sequences fit, and every step reads all of their KV) while a 10 %
cache fits about ten times the sequences and still reads the weights once per step for all of them.

How, for each length:

* **Size.** One prefill of one prompt per policy gives a sequence's kept entries per layer and KV head;
  the cost model (:func:`kvpolicy.bench.costmodel.fit_batch`: weights, each sequence's paged KV with
  its decode reserve and page slack, a workspace and prefill allowance, a margin) gives the largest
  batch against the memory budget (:func:`memory_budget`: free device memory on CUDA, available RAM
  on a CPU, or ``--memory-gib``).
* **Build.** A decode batch is built from prefilled caches (:func:`join`). By default every
  sequence is a copy of that one prefill (the prompt repeated, as ``--batch-size`` repeats it): the
  prefill waits in host memory between runs, so the batch timed has the device to itself and a batch
  of hundreds at 32K costs one prefill rather than hundreds; its layers are repeated with whole-tensor
  operations (:func:`tile`, field for field what ``PagedLayer.store`` would build). With
  ``prefill_batch`` every sequence is prefilled, that many at a time, while the sequences already
  prefilled hold their KV, and the sub-batches are joined through ``PagedLayer.store``.
* **Run.** The whole batch decodes together through the engine's own loop
  (:func:`kvpolicy.bench.runner.timed_decode`): tokens/s = batch x timed steps / decode seconds. A
  largest batch that runs out of memory anyway is halved and retried, and the cell says so.

Each cell carries the physical bound beside the measurement: the tokens/s a step reading the cost
model's bytes (weights once, every sequence's kept KV) at the measured read bandwidth would reach.
Repeats are interleaved across variants at each batch size, so drift cancels in the ratios.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpolicy.bench.costmodel import (
    BatchFit,
    ModelShape,
    decode_bytes_per_token,
    fit_batch,
    kv_element_bytes,
    kv_residual_bytes,
)
from kvpolicy.bench.machine import Machine
from kvpolicy.bench.runner import (
    FULL,
    _PeakMemory,
    _stats,
    decode_step,
    graph_note,
    timed_decode,
    warm_steps,
)
from kvpolicy.cache import KVPolicyCache, PagedLayer, layer_storage, paged_layer
from kvpolicy.generation import Prefill, _prefill
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy
from kvpolicy.state import Batch
from kvpolicy.storage import KVStorage

MAX = "max"
#: One sequence's entries in one layer, as ``PagedLayer.store`` takes them: keys ``(H, n, d)``,
#: values, positions ``(H, n)``, and entries per head (``None``: every head keeps all ``n``).
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def parse_batch_sizes(text: str) -> list[int | str]:
    """``"1,8,32,max"`` -> ``[1, 8, 32, "max"]``; anything else is an error naming the bad value."""
    out: list[int | str] = []
    for item in (t.strip() for t in text.split(",")):
        value: int | str
        if item == MAX:
            value = MAX
        else:
            try:
                value = int(item)
            except ValueError:
                raise ValueError(
                    f"--batch-sizes {text}: {item!r} is neither a batch size (an integer >= 1) nor 'max'"
                ) from None
            if value < 1:
                raise ValueError(
                    f"--batch-sizes {text}: {value} is not a batch size (integers >= 1, or 'max')"
                )
        if value in out:
            raise ValueError(f"--batch-sizes {text}: {item} is given twice")
        out.append(value)
    return out


# -- memory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes a throughput run may use, weights included, and where the figure came from."""

    total: int
    source: str


def available_ram() -> int:
    """Bytes of RAM available to a new allocation without swapping (``MemAvailable``; where there is
    no ``/proc/meminfo``, the free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_budget(device: torch.device, weights: int, gib: float | None = None) -> MemoryBudget:
    """The memory budget a batch is sized against, weights included: ``gib`` GiB when given; on CUDA
    the device's free memory plus what this process already holds (the weights, loaded before);
    on a CPU the available RAM plus the weights (already resident)."""
    if gib is not None:
        if not gib > 0:
            raise ValueError(f"--memory-gib must be > 0, got {gib}")
        return MemoryBudget(int(gib * 2**30), f"--memory-gib {gib:g}")
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
        return MemoryBudget(
            free + held, f"CUDA free {free / 2**30:.1f} GiB + {held / 2**30:.1f} GiB held (weights)"
        )
    if device.type == "cpu":
        ram = available_ram()
        return MemoryBudget(ram + weights, f"available RAM {ram / 2**30:.1f} GiB + weights")
    raise ValueError(f"no way to read free memory on {device.type!r}: give --memory-gib")


def _is_oom(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or during (a CUDA graph capture that fails
    to end after an allocation failed inside it; a policy error wrapping one), says an allocation failed
    (CUDA's OutOfMemoryError, the CPU allocator's error)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and any(
            s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _release(device: torch.device) -> None:
    """Give freed memory back between runs (a largest batch needs the whole device again)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- building a decode batch from prefilled caches ----------------------------------------------------


@dataclass
class Source:
    """Prefilled sequences to put into a decode batch: their request states, last logits ``(B, V)``,
    next positions ``(B,)``, each layer's next logical position, and ``parts(i)``: layer ``i``'s
    entries per sequence."""

    states: list[Any]
    logits: torch.Tensor
    next_positions: torch.Tensor
    next_position: list[int]
    block_size: int
    attn_implementation: str
    parts: Callable[[int], list[Part]]
    batch_scratch: bool = False
    #: host copies of the prefilled layers and the decode reserve they were built with (snapshots):
    #: what :func:`tile` repeats without rebuilding the layout sequence by sequence
    layers: list[PagedLayer] | None = None
    reserve: int | None = None
    #: how the prefilled layers store entries (the joined batch stores them the same way)
    storage: KVStorage | None = None


def _layer_parts(layer: PagedLayer) -> list[Part]:
    """Each sequence's entries of ``layer``: a row's entries sit in its slots ``0..length-1`` (an
    invariant of the cache), so its first ``length`` slots of the dense view are exactly them."""
    lengths = layer.lengths.tolist()  # a host read: joining is prefill-time work
    keys, values, positions = (
        layer.dense(layer.k_pool),
        layer.dense(layer.v_pool),
        layer.dense(layer.pos_pool),
    )
    parts: list[Part] = []
    for b, heads in enumerate(lengths):
        n = max(heads)
        counts = None if min(heads) == n else torch.tensor(heads, dtype=torch.long)
        parts.append((keys[b, :, :n], values[b, :, :n], positions[b, :, :n], counts))
    return parts


def _joinable(pre: Prefill) -> None:
    """Refuse a hybrid model's batch: its recurrent state (``KVPolicyCache.states``) is not joined."""
    if getattr(pre.cache, "states", None) is not None:
        raise ValueError(
            "the throughput bench joins paged KV layers only; this model keeps recurrent or latent state "
            "in its layer cache (a hybrid or latent-attention model), which join does not carry yet"
        )


def from_prefill(pre: Prefill, consume: bool = False) -> Source:
    """The prefilled batch as a :class:`Source`, read layer by layer when joined; ``consume`` frees
    each layer of ``pre``'s cache once read (a sub-batch that is joined and then dropped: the batch
    then never holds two copies of its KV)."""
    _joinable(pre)
    cache = pre.cache

    def parts(i: int) -> list[Part]:
        got = _layer_parts(cache.layers[i])
        if consume:
            cache.layers[i] = paged_layer(cache.layers[i].block_size, layer_storage(cache.layers[i]))
        return got

    return Source(
        states=list(pre.states),
        logits=pre.logits,
        next_positions=pre.batch.next_positions,
        next_position=[layer.next_position for layer in cache.layers],
        block_size=cache.layers[0].block_size,
        attn_implementation=getattr(cache, "attn_implementation", "sdpa"),
        parts=parts,
        batch_scratch=bool(pre.batch._scratch),
        storage=cache_storage(cache),
    )


def snapshot(pre: Prefill, to: str | torch.device = "cpu") -> Source:
    """A copy of the prefilled batch in ``to``'s memory (host memory by default), kept across runs:
    between runs the device holds only the batch being timed."""
    _joinable(pre)
    cache = pre.cache
    layers = [_moved(layer, to) for layer in cache.layers]
    return Source(
        states=[_copy_state(s) for s in pre.states],
        logits=pre.logits.to(to, copy=True),  # copies even where ``to`` is the device: decoding
        next_positions=pre.batch.next_positions.to(to, copy=True),  # ``pre`` advances its positions
        next_position=[layer.next_position for layer in cache.layers],
        block_size=cache.layers[0].block_size,
        attn_implementation=getattr(cache, "attn_implementation", "sdpa"),
        parts=lambda i: _layer_parts(layers[i]),
        batch_scratch=bool(pre.batch._scratch),
        layers=layers,
        reserve=pre.states[0].max_new_tokens,  # what the prefill reserved per row (its ``reserve``)
        storage=cache_storage(cache),
    )


def _moved(layer: PagedLayer, to: str | torch.device) -> PagedLayer:
    """A copy of ``layer`` with every tensor copied to ``to``."""
    new = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            setattr(new, name, value.to(to, copy=True))
    new.device = torch.device(to)
    return new


#: The attributes of a stored ``PagedLayer`` :func:`tile` knows how to repeat; a layer with others (the
#: cache grew a field) is joined through ``PagedLayer.store`` instead, which is always right. (A layer
#: whose values live in its keys, ``shared_values``, has no ``_v_pool``: it is never tiled.)
TILE_FIELDS = frozenset(
    {
        "is_initialized", "block_size", "num_seqs", "num_heads", "room", "uniform", "pages_per_row",
        "next_position", "k_pool", "_v_pool", "pos_pool", "block_table", "page_owner", "page_rank",
        "_slot_flat", "_row_start", "lengths", "dtype", "device", "shared_values",
    }
)  # fmt: skip


#: What a quantized layer holds beyond the fields above (its pools are repeated as ``_pools()`` lists).
QUANT_FIELDS = frozenset({"storage", "head_dims"})


def cache_storage(cache: KVPolicyCache) -> KVStorage | None:
    """How the paged layers of ``cache`` store their entries (``None``: the model's dtype)."""
    return next((layer_storage(layer) for layer in cache.layers if isinstance(layer, PagedLayer)), None)


def tile(layer: PagedLayer, copies: int, device: str | torch.device) -> PagedLayer | None:
    """``copies`` repetitions of ``layer``'s sequences as one layer on ``device``: the layout
    ``PagedLayer.store`` builds for the repeated sequences (``test_tile_equals_store`` checks every
    field), made with a few whole-tensor operations instead of store's per-sequence and per-row host
    loop, which for a batch of a thousand sequences takes seconds per layer. ``None`` where the layer
    has fields this does not know (then :func:`join` uses ``store``): KIVI's layout among them, whose
    key records and residuals ``store`` rebuilds from the dequantized entries (the same layout and
    bytes, codes rounded again: what a throughput run times is unchanged)."""
    pools = set(layer._pools())
    held = set(vars(layer)) - pools - {"_v_pool"} - QUANT_FIELDS  # (v_pool's own storage is _v_pool)
    if layer.shared_values or held != TILE_FIELDS - {"k_pool", "_v_pool", "pos_pool"}:
        return None
    pages = layer.pos_pool.shape[0] - 1  # the last page is the all-empty null page
    rows = layer.block_table.shape[0]
    at = torch.arange(copies, device=device)

    def repeat(pool: torch.Tensor) -> torch.Tensor:
        pool = pool.to(device)
        return torch.cat([pool[:pages]] * copies + [pool[pages:]])

    new = paged_layer(layer.block_size, layer_storage(layer))
    for name in layer._pools():  # keys and values as stored (quantized: codes and scales), positions
        setattr(new, name, repeat(getattr(layer, name)))
    if hasattr(layer, "head_dims"):
        new.head_dims = layer.head_dims
    table = layer.block_table.to(device)[None]
    shifted = torch.where(table == pages, pages * copies, table + at[:, None, None] * pages)
    new.block_table = shifted.reshape(copies * rows, -1)
    owner = layer.page_owner.to(device)[:pages]
    new.page_owner = torch.cat(
        [(owner[None] + at[:, None] * rows).reshape(-1), owner.new_full((1,), rows * copies)]
    )
    rank = layer.page_rank.to(device)
    new.page_rank = torch.cat([rank[:pages].repeat(copies), rank[pages:]])
    new.lengths = layer.lengths.to(device).repeat(copies, 1)
    new.num_seqs, new.num_heads = layer.num_seqs * copies, layer.num_heads
    new.room, new.uniform, new.next_position = layer.room, layer.uniform, layer.next_position
    new.pages_per_row = list(layer.pages_per_row) * copies
    new.dtype, new.device = layer.dtype, new.pos_pool.device
    new.is_initialized = True
    new._index_slots()
    return new


def _to(t: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _copy_state(state: Any) -> Any:
    """A request state for another sequence of a batch: its own lists and policy scratch (tensors
    copied), no batch yet."""
    new = copy.copy(state)
    new.batch = None
    new.tokens_per_layer = list(state.tokens_per_layer)
    new.discarded_tokens_per_layer = list(state.discarded_tokens_per_layer)
    new._scratch = copy.deepcopy(state._scratch)
    return new


def join(sources: Sequence[Source], copies: int = 1, reserve: int = 0, device: Any = None) -> Prefill:
    """One decode batch of every sequence of ``sources``, ``copies`` times over, on ``device``: a
    fresh cache built layer by layer through ``PagedLayer.store`` (the cache's own constructor, so its
    layout, reserve of ``reserve`` decode tokens per row included, is what a prefill of the whole batch
    would build), with a copy of each sequence's request state. Decoding it equals decoding the
    sequences prefilled together (``test_join_decodes_like_one_batch``).

    Why: a prefill holds full-length activations per sequence, so a long-context batch that fits in
    memory for decoding may not fit for prefilling at once; prefilled in sub-batches (or as copies of
    one), it still decodes as one batch."""
    if copies < 1 or not sources:
        raise ValueError(f"join needs at least one source and copies >= 1, got {len(sources)}, {copies}")
    if any(s.batch_scratch for s in sources):
        raise ValueError("cannot join batches whose policies kept batch-level state during prefill")
    first = sources[0]
    device = device if device is not None else first.logits.device
    n_layers = len(first.next_position)
    cache = KVPolicyCache(n_layers, first.block_size, first.attn_implementation, storage=first.storage)
    repeat = len(sources) == 1 and first.layers is not None and first.reserve == reserve
    for i in range(n_layers):
        tiled = tile(first.layers[i], copies, device) if repeat else None  # type: ignore[index]
        if tiled is not None:
            cache.layers[i] = tiled
            continue
        parts: list[Part] = []
        for source in sources:
            parts += [tuple(_to(t, device) for t in part) for part in source.parts(i)]  # type: ignore[misc]
        layer = cache.layers[i]
        layer.store(parts * copies, reserve=reserve)
        ends = {s.next_position[i] for s in sources}
        if len(ends) == 1:  # as the adapter's prefill: a logical length only where all agree
            layer.next_position = ends.pop()
        del parts
    states = [_copy_state(s) for _ in range(copies) for source in sources for s in source.states]
    for index, state in enumerate(states):
        state.index = index
    next_positions = torch.cat([s.next_positions.to(device) for s in sources] * copies)
    batch = Batch(states, cache, next_positions)  # points each state at it (weakly)
    logits = torch.cat([s.logits.to(device) for s in sources] * copies)
    return Prefill(logits=logits, batch=batch, seconds=0.0)


# -- the measurement ------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed decode of one batch."""

    batch: int
    decode_s_per_step: float
    steps: int
    prefill_s: float
    kv_bytes_allocated: int
    peak_bytes: int | None
    warm_s: float = 0.0  # the untimed warm steps (compiling, recording graphs)
    graphs: str | None = None  # whether recorded graphs replayed (runner.graph_note)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.decode_s_per_step if self.decode_s_per_step > 0 else float("nan")


@dataclass
class Cell:
    """One (variant, length, requested batch size) over the timed repeats.

    ``requested`` is a batch size or ``"max"``; ``batch`` the batch that ran (``None``: none did).
    ``status``: ``"ok"``, ``"does not fit"`` (the cost model's largest batch is smaller) or ``"out of
    memory"``; ``oom`` lists the batches that ran out of memory (a ``max`` batch is halved after each).
    ``tokens_per_s`` is generated tokens per second of the whole batch (batch x steps / seconds), with
    the physical bound beside it (``bound_tokens_per_s``: the cost model's decode bytes at the measured
    read bandwidth) and the share reached. ``speedup`` is over full KV at the same batch size; for
    ``max``, ``vs_full_max`` is over full KV at *its* largest batch (and ``vs_full_max_bound`` the same
    ratio of the bounds)."""

    variant: str
    length: int
    requested: int | str
    batch: int | None
    status: str
    fits: int
    prefill: str
    oom: list[int] = field(default_factory=list)
    decode_steps: int = 0
    decode_ms_per_step: dict[str, float] | None = None
    tokens_per_s: dict[str, float] | None = None
    bound_tokens_per_s: float | None = None
    bound_share: float | None = None
    speedup: float | None = None
    speedup_bound: float | None = None
    vs_full_max: float | None = None
    vs_full_max_bound: float | None = None
    kv_bytes_per_sequence: int = 0
    kv_tokens_per_layer: list[float] = field(default_factory=list)
    kv_bytes_allocated: int | None = None
    planned_bytes: int | None = None
    peak_bytes: int | None = None
    prefill_s: float | None = None
    warm_s: float | None = None
    fit: dict[str, Any] | None = None
    graphs: str | None = None  # whether recorded graphs replayed (runner.graph_note), last run


def _run(
    adapter: Any,
    prompt: torch.Tensor,
    policy: Policy,
    source: Source | None,
    batch: int,
    gen: int,
    step_fn: Any,
    warm: int,
    prefill_batch: int | None,
) -> Run:
    """Build a decode batch of ``batch`` sequences (copies of ``source``, or every sequence prefilled
    ``prefill_batch`` at a time) and time its decode."""
    device = prompt.device
    with _PeakMemory(device) as mem:
        if source is not None:
            pre = join([source], copies=batch, reserve=gen, device=device)
            prefill_s = 0.0
        else:
            assert prefill_batch is not None
            subs, prefill_s = [], 0.0
            for start in range(0, batch, prefill_batch):
                sub = _prefill(adapter, [prompt] * min(prefill_batch, batch - start), policy, reserve=gen)
                prefill_s += sub.seconds
                subs.append(from_prefill(sub, consume=True))
                del sub
            pre = join(subs, reserve=gen, device=device)
            del subs
        allocated = pre.cache.allocated_bytes()
        seconds, steps, _, warm_s = timed_decode(pre, policy, step_fn, gen, warm)
        note = graph_note(pre.batch, graphs=pre.batch.graphs is not None)
        del pre
        peak = mem.peak()
    return Run(batch, seconds, steps, prefill_s, allocated, peak, warm_s, note)


def throughput(
    model: nn.Module,
    prompts: dict[int, torch.Tensor],
    policies: dict[str, Policy],
    batch_sizes: Sequence[int | str],
    gen: int,
    repeats: int = 3,
    warmup: int = 1,
    memory_gib: float | None = None,
    compile: bool = False,
    graphs: bool = False,
    prefill_batch: int | None = None,
    machine: Machine | None = None,
    progress: Callable[[], None] | None = None,
    say: Callable[[str], None] | None = None,
    on_length: Callable[[int, list[Cell]], None] | None = None,
    run: Callable[..., Run] = _run,
) -> list[Cell]:
    """Tokens/s of full KV and every policy at every length and batch size (see the module doc).

    ``prompts`` maps a length to token ids (the first row is the prompt); ``batch_sizes`` are ints and
    ``"max"``; ``memory_gib`` overrides the memory budget; ``compile`` / ``graphs`` choose the decode
    step; ``prefill_batch`` ``None`` builds every batch from copies of one prefill, else prefills every
    sequence that many at a time. ``say`` receives a line per plan, run and retry as they happen;
    ``on_length`` each length's cells. ``run`` is the function building and timing one batch (tests
    replace it to simulate running out of memory)."""
    warm = warm_steps(compile, graphs)
    if gen <= warm:
        raise ValueError(f"--gen must be > {warm}, the untimed warm steps of this decode path, got {gen}")
    if prefill_batch is not None and prefill_batch < 1:
        raise ValueError(f"--prefill-batch must be >= 1, got {prefill_batch}")
    note = say or (lambda text: None)
    variants: dict[str, Policy] = {FULL: get_policy("fullkv")}
    variants.update({k: v for k, v in policies.items() if k != FULL})
    adapter = get_adapter(model)
    shape = ModelShape.from_config(model.config)
    elem = next(model.parameters()).element_size()
    step_fn = decode_step(adapter, compile, graphs)
    how = "copies of one prefill" if prefill_batch is None else f"prefilled {prefill_batch} at a time"
    cells: list[Cell] = []
    for length, ids in prompts.items():
        prompt = ids[0]
        device = prompt.device
        sources: dict[str, Source | None] = {}
        sized: dict[str, tuple[list[list[int]], list[float], int, float]] = {}
        for name, policy in variants.items():
            with torch.no_grad():
                pre = _prefill(adapter, [prompt], policy, reserve=gen)
            heads = pre.cache.kv_head_lengths(0)
            sized[name] = (heads, pre.cache.kv_lengths_of(0), pre.cache.layers[0].block_size, pre.seconds)
            sources[name] = snapshot(pre) if prefill_batch is None else None
            del pre
            _release(device)
        budget = memory_budget(device, _weights(model), memory_gib)
        note(f"{length}: memory budget {budget.total / 2**30:.2f} GiB ({budget.source}); batches {how}")
        fits: dict[str, BatchFit] = {}
        for name, (heads, _, block, _) in sized.items():
            storage = variants[name].storage
            kv_elem, fixed = kv_element_bytes(storage, shape, elem), kv_residual_bytes(storage, shape, elem)
            fit = fit_batch(
                shape, elem, heads, gen, block, length, budget.total, prefill_batch, kv_elem, fixed
            )
            fits[name] = fit
            note(
                f"{length} {name}: {fit.kv_per_sequence / 2**20:.1f} MiB KV per sequence (kept + reserve "
                f"+ page slack) + {fit.workspace_per_sequence / 2**20:.1f} MiB workspace; weights "
                f"{fit.weights / 2**30:.2f} GiB, prefill {fit.prefill / 2**30:.2f} GiB -> "
                f"{fit.max_batch} fit"
            )
        # the batch each (variant, requested) runs at; None where it does not fit or ran out of memory
        size: dict[tuple[str, int | str], int | None] = {}
        state: dict[tuple[str, int | str], Cell] = {}
        samples: dict[tuple[str, int | str], list[Run]] = {}
        for req in batch_sizes:
            for name in variants:
                key = (name, req)
                fit = fits[name].max_batch
                want = fit if req == MAX else int(req)
                ok = want >= 1 and want <= fit
                size[key] = want if ok else None
                heads, kv_tokens, _, prefill_s = sized[name]
                state[key] = Cell(
                    variant=name,
                    length=length,
                    requested=req,
                    batch=size[key],
                    status="ok" if ok else "does not fit",
                    fits=fit,
                    prefill=how,
                    kv_bytes_per_sequence=fits[name].kv_per_sequence,
                    kv_tokens_per_layer=list(kv_tokens),
                    prefill_s=prefill_s,
                    fit=asdict(fits[name]),
                )
                samples[key] = []
        for rep in range(warmup + repeats):
            for req in batch_sizes:
                for name, policy in variants.items():
                    key = (name, req)
                    cell = state[key]
                    while size[key] is not None:
                        b = size[key]
                        assert b is not None
                        result: Run | None = None
                        try:
                            result = run(
                                adapter, prompt, policy, sources[name], b, gen, step_fn, warm, prefill_batch
                            )
                        except (RuntimeError, MemoryError) as exc:
                            if not _is_oom(exc):
                                raise
                        _release(device)
                        if result is not None:
                            if rep >= warmup:
                                samples[key].append(result)
                            label = "warm-up" if rep < warmup else f"repeat {rep - warmup + 1}"
                            note(
                                f"{length} {name} batch {b}{' (max)' if req == MAX else ''} {label}: "
                                f"{result.tokens_per_s:.1f} tokens/s ({1000 * result.decode_s_per_step:.2f} "
                                f"ms/step; untimed warm steps {result.warm_s:.2f} s)"
                                + (f"; {result.graphs}" if result.graphs else "")
                            )
                            break
                        cell.oom.append(b)
                        if req == MAX and b > 1:
                            size[key] = b // 2
                            samples[key].clear()  # samples of a larger batch are not this cell's
                            note(f"{length} {name}: batch {b} ran out of memory; retrying at {b // 2}")
                        else:
                            size[key] = None
                            cell.status = "out of memory"
                            note(f"{length} {name}: batch {b} ran out of memory")
                    if progress is not None:
                        progress()
        these = [
            _summarise(
                state[key], samples[key], shape, elem, gen, machine,
                kv_element_bytes(variants[key[0]].storage, shape, elem),
                kv_residual_bytes(variants[key[0]].storage, shape, elem),
            )
            for key in state
        ]  # fmt: skip
        _compare(these)
        cells += these
        if on_length is not None:
            on_length(length, these)
        del sources
        _release(device)
    return cells


def _weights(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _summarise(
    cell: Cell,
    runs: list[Run],
    shape: ModelShape,
    elem: int,
    gen: int,
    machine: Machine | None,
    kv_elem: float | None = None,
    kv_fixed: float = 0,
) -> Cell:
    if not runs:  # did not fit, or ran out of memory at every size tried
        cell.batch = None
        return cell
    batch = runs[-1].batch
    cell.batch = batch
    cell.decode_steps = runs[-1].steps
    cell.decode_ms_per_step = _stats([1000 * r.decode_s_per_step for r in runs])
    cell.tokens_per_s = _stats([r.tokens_per_s for r in runs])
    cell.kv_bytes_allocated = runs[-1].kv_bytes_allocated
    cell.warm_s = statistics.median(r.warm_s for r in runs)
    cell.graphs = runs[-1].graphs
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    cell.peak_bytes = int(statistics.median(peaks)) if peaks else None
    if cell.fit is not None:
        cell.planned_bytes = BatchFit(**cell.fit).bytes_for(batch)
    if machine is not None:
        nbytes = decode_bytes_per_token(shape, cell.kv_tokens_per_layer, elem, gen, batch, kv_elem, kv_fixed)
        cell.bound_tokens_per_s = batch * machine.read_bytes_per_s / nbytes
        cell.bound_share = cell.tokens_per_s["median"] / cell.bound_tokens_per_s
    return cell


def _compare(cells: list[Cell]) -> None:
    """Ratios to full KV: at the same batch size, and at each one's largest batch."""
    full = {c.requested: c for c in cells if c.variant == FULL}
    for cell in cells:
        ref = full.get(cell.requested)
        if ref is None or cell.tokens_per_s is None or ref.tokens_per_s is None:
            continue
        ratio = cell.tokens_per_s["median"] / ref.tokens_per_s["median"]
        bound = None
        if cell.bound_tokens_per_s and ref.bound_tokens_per_s:
            bound = cell.bound_tokens_per_s / ref.bound_tokens_per_s
        if cell.requested == MAX:
            cell.vs_full_max, cell.vs_full_max_bound = ratio, bound
        if cell.requested != MAX or cell.batch == ref.batch:
            cell.speedup, cell.speedup_bound = ratio, bound


def cells_to_json(cells: list[Cell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]


# -- reporting ------------------------------------------------------------------------------------


def _tps(cell: Cell | None) -> str:
    """``1234 (45%)``: tokens/s and its share of the bound; ``-`` where it did not fit, ``OOM``."""
    if cell is None:
        return ""
    if cell.tokens_per_s is None:
        return "OOM" if cell.status == "out of memory" else "-"
    share = f" ({cell.bound_share:.0%})" if cell.bound_share is not None else ""
    return f"{cell.tokens_per_s['median']:.4g}{share}"


def summary_rows(cells: list[Cell], batch_sizes: Sequence[int | str]) -> tuple[list[str], list[list[str]]]:
    """One row per (variant, length): sequences that fit, tokens/s at each batch size (share of the
    bound), tokens/s over full KV's at each one's largest batch (bound), KV MiB per sequence."""
    head = ["variant", "length", "fit (ran)"]
    head += [f"tok/s @{'max' if b == MAX else b}" for b in batch_sizes]
    head += ["vs full KV at max (bound)", "KV MiB/seq"]
    by: dict[tuple[str, int], dict[int | str, Cell]] = {}
    for c in cells:
        by.setdefault((c.variant, c.length), {})[c.requested] = c
    rows = []
    for (variant, length), group in by.items():
        any_cell = next(iter(group.values()))
        top = group.get(MAX)
        ran = f"{any_cell.fits}"
        if top is not None and top.batch is not None and top.batch != any_cell.fits:
            ran += f" ({top.batch}, OOM at {', '.join(map(str, top.oom))})"
        ratio = "-"
        if top is not None and top.vs_full_max is not None:
            bound = f" ({top.vs_full_max_bound:.2f}x)" if top.vs_full_max_bound else ""
            ratio = f"{top.vs_full_max:.2f}x{bound}"
        row = [variant, str(length), ran]
        row += [
            _tps(group.get(b))
            + (f" b={group[b].batch}" if b == MAX and b in group and group[b].batch else "")
            for b in batch_sizes
        ]
        row += [ratio, f"{any_cell.kv_bytes_per_sequence / 2**20:.1f}"]
        rows.append(row)
    return head, rows


def markdown(cells: list[Cell], batch_sizes: Sequence[int | str]) -> str:
    """The summary as a Markdown table (for docs/performance.md)."""
    head, rows = summary_rows(cells, batch_sizes)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows]
    return "\n".join(lines) + "\n"
