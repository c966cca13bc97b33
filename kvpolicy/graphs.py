"""Graph-replayed decode: record a whole decode step once, then replay it every step.

Why (measured on an H200; the docs' Performance page, GPU section): an eager decode step of a
32-layer model is about 2,200 kernel launches, ~40 ms of launch overhead on an H200 whatever the
policy, where the bytes a step must read take 4-8 ms. ``torch.compile``'s ``reduce-overhead`` mode
never replayed its CUDA graphs here, because the cache and the policies' state are mutated inputs
that are not static. This module records the step explicitly instead (``torch.cuda.CUDAGraph``):
every tensor the step touches sits at a fixed address, so one recorded graph of all layers, the
cache policy's decode hooks and the logits replays as one launch. No inductor compile is needed
(``compile=True`` can still fuse inside the recorded step).

What stays on the host, outside the graph (``DecoderAdapter.prepare_step``): room in the cache (its
growth reallocates the pools, so every graph of the batch is dropped and recorded again, at most
``log2`` times; ``generate`` and the bench reserve ``max_new_tokens`` and never grow), the device step
counter, and which *variant* a step is (:meth:`~kvpolicy.interfaces.CachePolicy.decode_variant`:
PyramidInfer's squeeze steps run other code than its recording steps, so each variant has its graph).

The decode-state contract a policy keeps (checked here, on every device):

* state kept across decode steps is allocated at prefill or at the first decode step of a batch
  (which always runs eagerly, as does the first step after the cache's layout changed), then updated
  in place; a recorded step that rebinds or adds a tensor in its scratch raises
  :class:`GraphContractError` naming the policy and the entry;
* nothing in a step reads the device from the host (``.item()``, ``bool(tensor)``, boolean-mask
  indexing) or builds a tensor from host data (``torch.tensor([...])``): checked while recording;
* a Python value that changes per step never reaches tensor code; read
  :attr:`~kvpolicy.interfaces.DecodeView.step_tensor`.

Graphs live on the :class:`~kvpolicy.state.Batch` (:attr:`~kvpolicy.state.Batch.graphs`) and go with
it, so an eval of hundreds of prompts never accumulates recordings. Before each replay the addresses
of the batch's state are compared with the recorded ones (a few hundred pointer reads on the host,
overlapping the device's work); if anything moved (growth, a restored cache that had to be
reallocated) the graphs are recorded again, never replayed over stale memory.

Where there is no CUDA, the same protocol runs with a *traced* step instead of a CUDA graph
(``torch.fx`` ``make_fx``): Python control flow, host ints and tensor addresses are baked in exactly
as a CUDA graph bakes them, and replay reruns the recorded ops on the same tensors. That is how the
contract and "graph decode equals eager, token for token" are tested on a CPU. It is not faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kvpolicy.cache import state_tensors
from kvpolicy.interfaces import EAGER_STEP

#: Tensor methods and functions that read a device tensor back to the host (a sync: not recordable).
HOST_READS = frozenset(
    {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
)
#: Functions that copy host data to the device (not recordable inside a CUDA graph).
HOST_WRITES = frozenset({"tensor", "as_tensor", "from_numpy"})


class GraphContractError(RuntimeError):
    """A decode step cannot be recorded and replayed as it is; the message says what and where."""


class HostReadGuard(TorchFunctionMode):
    """Fails on any call inside it that reads the device from the host or copies host data in.

    What a recorded step may not do: a CUDA graph records device work only, so a host read would be
    made once at recording and its value baked into every replay (or fail to record at all)."""

    def __init__(self, what: str = "a decode step") -> None:
        super().__init__()
        self.what = what

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise GraphContractError(f"host read in {self.what}: Tensor.{name} waits for the device")
        if name in HOST_WRITES and args and not isinstance(args[0], torch.Tensor):
            raise GraphContractError(
                f"host data copied to the device in {self.what}: torch.{name}(...); make the tensor "
                f"once before decoding (prefill or the first decode step) and keep it in scratch"
            )
        if name == "__getitem__" and len(args) > 1 and _has_bool_index(args[1]):
            raise GraphContractError(
                f"boolean-mask indexing in {self.what} (a data-dependent shape and a host read); "
                f"use torch.where or masked_fill"
            )
        return func(*args, **(kwargs or {}))


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


# -- what a decode step may touch ------------------------------------------------------------------
def _walk(value: Any, path: str | None, out: list[Any]) -> None:
    """Append the tensors in ``value`` (nested dicts, lists, tuples) to ``out``: ``(path, tensor)``
    pairs, or bare tensors when ``path`` is ``None`` (the per-step check builds no strings)."""
    if isinstance(value, torch.Tensor):
        out.append(value if path is None else (path, value))
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, None if path is None else f"{path}[{key!r}]", out)
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            _walk(item, None if path is None else f"{path}[{j}]", out)


def decode_state(batch: Any, policy: Any, named: bool = True) -> list[Any]:
    """Every tensor a recorded decode step of ``batch`` under ``policy`` may read or write: each cache
    layer's tensors, the positions, step counter and flags, and the policies' scratch (the batch's, and
    each request's unless the cache policy ``decodes_batched``: such a policy keeps its decode state in
    the batch's scratch and reads the requests' only at the first, eager step). ``named``: as
    ``(path, tensor)`` pairs naming each, else bare tensors (cheaper: the check before every replay)."""
    names: dict[int, str] = {}
    if named:
        for part in (policy.cache, policy.propagation):
            names[id(part)] = f"{type(part).__name__} ({part.kind!r})"
    out: list[Any] = []
    for i, layer in enumerate(batch.cache.layers):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                out.append((f"cache layer {i} {name}", value) if named else value)
    for i, name, value in state_tensors(batch.cache.states):  # a hybrid's recurrent state
        out.append((f"recurrent state of layer {i} {name}", value) if named else value)
    for name in ("next_positions", "step_counter", "flags"):
        out.append((name, getattr(batch, name)) if named else getattr(batch, name))
    for owner, store in batch._scratch.items():
        _walk(store, f"batch scratch of {names.get(owner, 'policy')}" if named else None, out)
    if not policy.cache.decodes_batched:
        for b, state in enumerate(batch.states):
            for owner, store in state._scratch.items():
                _walk(store, f"request {b} scratch of {names.get(owner, 'policy')}" if named else None, out)
    return out


Fingerprint = tuple[Any, ...]


def fingerprint(batch: Any, policy: Any) -> Fingerprint:
    """Addresses, shapes and dtypes of :func:`decode_state`: what a recorded step has baked in."""
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in decode_state(batch, policy, named=False))


def _named_fingerprint(batch: Any, policy: Any) -> Fingerprint:
    return tuple((path, t.data_ptr(), tuple(t.shape), t.dtype) for path, t in decode_state(batch, policy))


def describe_change(before: Fingerprint, after: Fingerprint) -> str:
    """The first difference between two fingerprints, in words."""
    old = {path: rest for path, *rest in before}
    new = {path: rest for path, *rest in after}
    for path in new:
        if path not in old:
            return f"{path} was added"
    for path in old:
        if path not in new:
            return f"{path} was removed"
    for path, rest in new.items():
        if old[path] != rest:
            if old[path][0] != rest[0] and old[path][1:] == rest[1:]:
                return f"{path} was rebound to a new tensor (update it in place: copy_, index_copy_, +=)"
            return f"{path} changed from shape {old[path][1]} to {rest[1]}"
    return "nothing"


# -- recording backends ----------------------------------------------------------------------------
class _CudaGraphs:
    """CUDA graphs: one memory pool per batch, eager steps on a side stream (so lazy initialisation,
    cuBLAS workspaces included, happens before any recording)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def eager(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Record ``fn`` (recording runs nothing), then replay it once: this step's result."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        graph.replay()
        return graph, out

    @staticmethod
    def replay(recorded: tuple[Any, torch.Tensor]) -> torch.Tensor:
        graph, out = recorded
        graph.replay()
        return out


class _TracedGraphs:
    """The CPU stand-in for CUDA graphs: ``make_fx`` records the step's aten ops with every tensor it
    did not create as a constant (the same object), so replay mutates the same cache and state, and
    host values are baked in as a CUDA graph bakes them. Tracing runs the step: it is this step."""

    @staticmethod
    def eager(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()

    @staticmethod
    def record(fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        result: list[torch.Tensor] = []

        def traced() -> torch.Tensor:
            out = fn()
            result.append(out)
            return out

        module = make_fx(traced)()
        return module, result[0].detach().clone()

    @staticmethod
    def replay(recorded: tuple[Any, torch.Tensor]) -> torch.Tensor:
        module, _ = recorded
        return module()


# -- the per-batch replayer ------------------------------------------------------------------------
class DecodeGraphs:
    """The recorded decode steps of one :class:`~kvpolicy.state.Batch`, one per variant.

    Attributes (counters for the bench and tests):
        eager_steps: steps run eagerly (the first, and the first after the state moved).
        recordings: graphs recorded.
        replays: steps replayed from a recorded graph (the step that records one not counted).
    """

    def __init__(self, adapter: Any, batch: Any, forward: Callable[..., torch.Tensor]) -> None:
        self.adapter = adapter
        self.forward = forward
        device = batch.next_positions.device
        self.backend: Any = _CudaGraphs(device) if device.type == "cuda" else _TracedGraphs()
        self.token = torch.zeros((batch.size, 1), dtype=torch.long, device=device)  # the input buffer
        self.graphs: dict[Any, tuple[Any, torch.Tensor]] = {}
        self.recorded_state: Fingerprint | None = None
        self.eager_steps = self.recordings = self.replays = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copied batch (compress once, answer many) records its own graphs

    def step(self, token_ids: torch.Tensor, policy: Any, batch: Any, step: int) -> torch.Tensor:
        """One decode step (the host half already done): eager, recorded, or replayed."""
        now = fingerprint(batch, policy)
        if now != self.recorded_state:  # first step, or the state moved: eager, then record anew
            self.graphs.clear()
            self.eager_steps += 1
            with self.adapter.routing():
                out = self.backend.eager(lambda: self.forward(token_ids, policy, batch, step))
            self.recorded_state = fingerprint(batch, policy)
            return out
        variant = policy.cache.decode_variant(step, batch)
        if variant == EAGER_STEP:  # the policy changes host-side state at this step
            self.recorded_state = None
            return self.step(token_ids, policy, batch, step)
        self.token.copy_(token_ids)
        recorded = self.graphs.get(variant)
        if recorded is not None:
            self.replays += 1
            return self.backend.replay(recorded).clone()
        named = _named_fingerprint(batch, policy)
        try:
            with self.adapter.routing(), HostReadGuard("a recorded decode step"):
                recorded = self.backend.record(lambda: self.forward(self.token, policy, batch, step))
        except Exception as exc:  # a breach inside a policy hook comes wrapped, naming policy and layer
            if isinstance(exc.__cause__, GraphContractError):
                raise GraphContractError(str(exc)) from exc
            raise
        if fingerprint(batch, policy) != now:
            raise GraphContractError(
                f"decode step {step} of policy {policy.describe()} cannot be replayed: "
                f"{describe_change(named, _named_fingerprint(batch, policy))} inside the step"
            )
        self.recordings += 1
        self.graphs[variant] = recorded
        return recorded[1].clone()

    def stats(self) -> dict[str, int]:
        return {"eager_steps": self.eager_steps, "recordings": self.recordings, "replays": self.replays}


def graph_decode_step(adapter: Any, compile: bool = False) -> Callable[..., torch.Tensor]:
    """The adapter's decode step, replayed from recorded graphs (``generate(..., graphs=True)``).

    Same signature as ``adapter.decode_step``. ``compile``: record the ``torch.compile``-d forward
    (inductor's fused kernels inside the graph; CUDA only, the CPU stand-in records the eager one)."""
    forward = adapter.decode_forward
    if compile:
        from kvpolicy.generation import compiled_forward

        forward = compiled_forward(adapter, graphs=True)

    def step(token_ids: torch.Tensor, policy: Any, batch: Any, step: int) -> torch.Tensor:
        adapter.prepare_step(batch, step)
        if batch.graphs is None:
            cpu_stand_in = batch.next_positions.device.type != "cuda"
            batch.graphs = DecodeGraphs(adapter, batch, adapter.decode_forward if cpu_stand_in else forward)
        return batch.graphs.step(token_ids, policy, batch, step)

    return step
