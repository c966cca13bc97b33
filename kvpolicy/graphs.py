"""Graph-replayed decode: record a whole decode step once, then replay it every step.

Why (measured on an H200; the docs' Performance page, GPU section): an eager decode step of a
32-layer model is about 2,200 kernel launches, ~40 ms of launch overhead on an H200 whatever the
policy, where the bytes a step must read take 4-8 ms. ``torch.compile``'s ``reduce-overhead`` mode
never replayed its CUDA graphs here, because the cache and the policies' state are mutated inputs
that are not static. This module records the step explicitly instead (``torch.cuda.CUDAGraph``):
every tensor the step touches sits at a fixed address, so one recorded graph of all layers, the
cache policy's decode hooks and the logits replays as one launch. No inductor compile is needed;
``compile=True`` fuses inside the recorded step (counted on a CPU for the Llama-3.1-8B shape, full
KV, attention as one op: 51 aten ops a layer become 14 launches, 6 fused kernels, 7 GEMMs and the
attention; ~1,650 a step become ~450): the compiled forward is recorded, compiled before any
recording and never inside one (:class:`DecodeGraphs` says how).

What stays on the host, outside the graph (``DecoderAdapter.prepare_step``): room in the cache (its
growth reallocates the pools, so every graph of the batch is dropped and recorded again, at most
``log2`` times; ``generate`` and the bench reserve ``max_new_tokens`` and never grow), the device step
counter, and which *variant* a step is (:meth:`~kvpolicy.interfaces.CachePolicy.decode_variant`:
PyramidInfer's squeeze steps run other code than its recording steps, so each variant has its graph,
recorded at the variant's second occurrence: the first runs eagerly).

The decode-state contract a policy keeps (checked here, on every device):

* state kept across decode steps is allocated at prefill, at the first decode step of a batch or at
  a variant's first step (which always run eagerly, as does the first step after the cache's layout
  changed), then updated in place; a recorded step that rebinds or adds a tensor in its scratch raises
  :class:`GraphContractError` naming the policy and the entry;
* nothing in a step reads the device from the host (``.item()``, ``bool(tensor)``, boolean-mask
  indexing, ops whose output size depends on the values, copies to the host) or builds a tensor from
  host data (``torch.tensor([...])``): checked while recording (:class:`HostReadGuard`; a compiled
  step is checked by ``fullgraph=True`` instead);
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
With ``compile=True`` it traces through the compiled forward (dynamo's graph, with the ``aot_eager``
backend in place of inductor, whose generated kernels it cannot see), so the recording of a compiled
step, its guards and its recompiles are tested on a CPU too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kvpolicy.cache import state_tensors
from kvpolicy.interfaces import EAGER_STEP

#: Tensor methods and functions that read a device tensor back to the host (a sync: not recordable):
#: conversions to Python values, comparisons that answer a Python bool, printing.
HOST_READS = frozenset(
    {
        *("item", "tolist", "numpy", "cpu", "__array__"),
        *("__bool__", "__int__", "__float__", "__index__", "__complex__", "is_nonzero", "__contains__"),
        *("equal", "allclose", "__repr__", "__format__"),
    }
)
#: Functions whose output's size depends on the values: the device reports the size to the host.
#: ``torch.where`` with one argument is ``nonzero``; ``repeat_interleave`` with tensor repeats and no
#: ``output_size`` and ``histc`` with ``min == max`` (its default: the range is read from the data)
#: are checked in :class:`HostReadGuard` itself.
DATA_DEPENDENT_SIZES = frozenset(
    {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
)
#: Functions that copy host data to the device (not recordable inside a CUDA graph).
HOST_WRITES = frozenset({"tensor", "as_tensor", "from_numpy"})


class GraphContractError(RuntimeError):
    """A decode step cannot be recorded and replayed as it is; the message says what and where."""


class HostReadGuard(TorchFunctionMode):
    """Fails on any call inside it that reads the device from the host or copies host data in.

    What a recorded step may not do: a CUDA graph records device work only, so a host read would be
    made once at recording and its value baked into every replay (or fail to record at all). Caught:
    :data:`HOST_READS`, :data:`DATA_DEPENDENT_SIZES` (and boolean-mask indexing, reading or writing,
    ``torch.where(condition)``, ``repeat_interleave`` with tensor repeats and no ``output_size``,
    ``histc`` over the data's own range), copies between the host and a device (``.to``, ``.cuda``,
    ``copy_``), and tensors made from host data (:data:`HOST_WRITES`, ``new_tensor``)."""

    def __init__(self, what: str = "a decode step") -> None:
        super().__init__()
        self.what = what

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        problem = _host_dependency(getattr(func, "__name__", ""), args, kwargs)
        if problem:
            raise GraphContractError(problem.format(what=self.what))
        return func(*args, **kwargs)


def _host_dependency(name: str, args: Any, kwargs: dict[str, Any]) -> str | None:
    """What in a call ``name(*args, **kwargs)`` needs the host (a template with ``{what}``), or None."""
    if name in HOST_READS:
        return f"host read in {{what}}: Tensor.{name} waits for the device"
    if name in DATA_DEPENDENT_SIZES or (name == "where" and len(args) + len(kwargs) == 1):
        return (
            f"data-dependent size in {{what}}: torch.{name} sizes its output from the values (a host "
            f"read); use a fixed-size form (torch.where(c, a, b), topk, masked_fill, scatter)"
        )
    if name == "repeat_interleave":
        repeats = args[0] if len(args) == 1 else args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return (
                "host read in {what}: repeat_interleave with tensor repeats sums them on the host; "
                "pass output_size"
            )
    if name == "histc":
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        if low == high:
            return "host read in {what}: histc with min == max reads the range from the data; give min < max"
    indexing = name in ("__getitem__", "__setitem__", "index_put", "index_put_")
    if indexing and len(args) > 1 and _has_bool_index(args[1]):
        return (
            "boolean-mask indexing in {what} (a data-dependent shape and a host read); "
            "use torch.where or masked_fill"
        )
    if name in HOST_WRITES and args and not isinstance(args[0], torch.Tensor):
        return (
            f"host data copied to the device in {{what}}: torch.{name}(...); make the tensor "
            f"once before decoding (prefill or the first decode step) and keep it in scratch"
        )
    if name == "new_tensor" and len(args) > 1 and not isinstance(args[1], torch.Tensor):
        return (
            "host data copied to the device in {what}: Tensor.new_tensor(...); make the tensor once "
            "before decoding and keep it in scratch"
        )
    if name in ("to", "cuda", "copy_") and args and isinstance(args[0], torch.Tensor):
        here = args[0].device
        there = _target_device(name, args, kwargs)
        if there is not None and (here.type == "cpu") != (there.type == "cpu"):
            direction = "to the host" if there.type == "cpu" else "from the host"
            return f"host transfer in {{what}}: Tensor.{name} copies {direction} ({here} to {there})"
    return None


def _target_device(name: str, args: Any, kwargs: dict[str, Any]) -> torch.device | None:
    """The device a ``to`` / ``cuda`` / ``copy_`` call moves data between, besides ``args[0]``'s."""
    if name == "copy_":
        src = args[1] if len(args) > 1 else kwargs.get("src")
        return src.device if isinstance(src, torch.Tensor) else None
    if name == "cuda":
        return torch.device("cuda")
    target = kwargs.get("device", kwargs.get("other"))
    if target is None and len(args) > 1:
        target = args[1]
    if isinstance(target, torch.Tensor):
        return target.device
    if isinstance(target, (str, torch.device)):
        return torch.device(target)
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.device("cuda", target)
    return None


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
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

    def record(self, fn: Callable[[], torch.Tensor], compiled: bool = False) -> tuple[Any, torch.Tensor]:
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

    @staticmethod
    def release(recorded: tuple[Any, torch.Tensor]) -> None:
        """Nothing to break: a ``CUDAGraph`` and its output are freed with the last reference."""


class _TracedGraphs:
    """The CPU stand-in for CUDA graphs: ``make_fx`` records the step's aten ops with every tensor it
    did not create as a constant (the same object), so replay mutates the same cache and state, and
    host values are baked in as a CUDA graph bakes them. Tracing runs the step: it is this step.

    A ``torch.compile``-d step is traced through dynamo (its compiled code runs, with the guards the
    eager step saw: ``make_fx``'s own torch-function mode and autocast-cache switch are lifted for the
    call), so the ops recorded are the compiled graph's; that needs a backend whose output runs aten
    ops (``eager``, ``aot_eager``), not inductor's generated kernels, which ``make_fx`` cannot see."""

    @staticmethod
    def traces_compiled() -> bool:
        """Whether this torch can trace through a compiled function (dynamo's
        ``force_compile_during_fx_trace``, present in 2.13); else the stand-in records the eager step."""
        import torch._dynamo

        return hasattr(torch._dynamo.config, "force_compile_during_fx_trace")

    @staticmethod
    def eager(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()

    @staticmethod
    def record(fn: Callable[[], torch.Tensor], compiled: bool = False) -> tuple[Any, torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        result: list[torch.Tensor] = []
        outside = _CallerState() if compiled else None

        def traced() -> torch.Tensor:
            if outside is None:
                out = fn()
            else:
                with outside.restored():
                    out = fn()
            result.append(out)
            return out

        if compiled:
            import torch._dynamo

            with torch._dynamo.config.patch(force_compile_during_fx_trace=True):
                module = make_fx(traced)()
        else:
            module = make_fx(traced)()
        # The tracer leaves reference cycles (its proxies and fx nodes) that hold the real tensors it
        # saw, the KV pools among them: collect them now, once per recording, so that the pools are
        # freed by reference counting when the batch ends (a CPU stand-in cost, never on CUDA).
        gc.collect()
        return module, result[0].detach().clone()

    @staticmethod
    def replay(recorded: tuple[Any, torch.Tensor]) -> torch.Tensor:
        module, _ = recorded
        with torch.no_grad():  # replayed ops build no autograd history on the cache they write
            return module()

    @staticmethod
    def release(recorded: tuple[Any, torch.Tensor]) -> None:
        """Drop the tensors a recording holds as constants (the batch's cache and state): an fx
        ``GraphModule`` is a reference cycle (``Graph.owning_module``), so without this they would wait
        for the cyclic collector after the batch ends."""
        module, _ = recorded
        module._buffers.clear()  # make_fx keeps the step's tensors as buffers, the model's weights as
        module._parameters.clear()  # parameters: the module is being discarded, so it keeps none


class _CallerState:
    """The torch-function modes and autocast-cache switch in force where it is made, restored inside
    ``make_fx`` (which pushes a mode of its own and turns the cache off): dynamo guards on both, so a
    compiled step traced there sees exactly what its eager run saw, as a CUDA capture does."""

    def __init__(self) -> None:
        from torch.overrides import _get_current_function_mode_stack

        self.modes = list(_get_current_function_mode_stack())
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        inner = []
        while torch._C._len_torch_function_stack() > 0:
            inner.append(torch._C._pop_torch_function_stack())
        for mode in self.modes:
            torch._C._push_on_torch_function_stack(mode)
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(self.autocast_cache)
        try:
            yield
        finally:
            torch.set_autocast_cache_enabled(cache)
            for _ in self.modes:
                torch._C._pop_torch_function_stack()
            for mode in reversed(inner):
                torch._C._push_on_torch_function_stack(mode)


def _would_compile(exc: BaseException) -> bool:
    """Whether ``exc`` is dynamo refusing to compile under the ``fail_on_recompile`` stance."""
    seen: BaseException | None = exc
    while seen is not None:
        if "stance is 'fail_on_recompile'" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# -- the per-batch replayer ------------------------------------------------------------------------
class DecodeGraphs:
    """The recorded decode steps of one :class:`~kvpolicy.state.Batch`, one per variant.

    A variant is recorded at its second occurrence: its first runs eagerly (first-use initialisation,
    lazy allocations and, for a compiled step, the compile happen there, never inside a recording),
    as does every step after the batch's state moved (growth, a restored cache), whose graphs are
    then recorded anew.

    With a ``torch.compile``-d forward (``compiled``), the recording calls it exactly as the eager
    step did: not under :class:`HostReadGuard`, since dynamo guards on the torch-function mode stack
    and a mode present only while recording would make it recompile inside the capture (an 8B
    inductor compile inside ``torch.cuda.graph``). The guard is not needed there: ``fullgraph=True``
    already refuses every host read (``.item()``, ``bool()``, data-dependent sizes are graph breaks),
    a host tensor in the step is a constant made at compile time, and a copy to the host fails the
    CUDA capture. Dynamo runs under the ``fail_on_recompile`` stance while recording: if the step's
    guards still differ from every compiled version (a Python ``step`` that reaches tensor code, the
    state the eager step allocated), nothing is recorded; the step runs eagerly, compiling there,
    and the variant is recorded at its next occurrence.

    Attributes (counters for the bench and tests):
        eager_steps: steps run eagerly (the first, a variant's first, the first after the state
            moved, and a compiled step that had to compile).
        recordings: graphs recorded.
        replays: steps replayed from a recorded graph (the step that records one not counted).
    """

    def __init__(
        self, adapter: Any, batch: Any, forward: Callable[..., torch.Tensor], compiled: bool = False
    ) -> None:
        self.adapter = adapter
        self.forward = forward
        self.compiled = compiled
        device = batch.next_positions.device
        self.backend: Any = _CudaGraphs(device) if device.type == "cuda" else _TracedGraphs()
        self.token = torch.zeros((batch.size, 1), dtype=torch.long, device=device)  # the input buffer
        self.graphs: dict[Any, tuple[Any, torch.Tensor]] = {}
        self.warm: set[Any] = set()  # variants run eagerly since the state last moved
        self.recorded_state: Fingerprint | None = None
        self.eager_steps = self.recordings = self.replays = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None  # a copied batch (compress once, answer many) records its own graphs

    def __del__(self) -> None:
        self._drop()  # the batch ended: its recordings let go of its cache at once

    def _drop(self) -> None:
        """Forget every recording (the state moved, or the batch ended)."""
        for recorded in self.graphs.values():
            self.backend.release(recorded)
        self.graphs.clear()

    def step(self, token_ids: torch.Tensor, policy: Any, batch: Any, step: int) -> torch.Tensor:
        """One decode step (the host half already done): eager, recorded, or replayed."""
        now = fingerprint(batch, policy)
        if now != self.recorded_state:  # first step, or the state moved: every variant anew
            self._drop()
            self.warm.clear()
        variant = policy.cache.decode_variant(step, batch)
        if variant == EAGER_STEP:  # the policy changes host-side state at this step
            self._drop()
            self.warm.clear()
            return self._eager(token_ids, policy, batch, step, now)
        if variant not in self.warm:
            self.warm.add(variant)
            return self._eager(token_ids, policy, batch, step, now)
        self.token.copy_(token_ids)
        recorded = self.graphs.get(variant)
        if recorded is not None:
            self.replays += 1
            return self.backend.replay(recorded).clone()
        named = _named_fingerprint(batch, policy)
        try:
            with self.adapter.routing(), self._recording_checks():
                recorded = self.backend.record(
                    lambda: self.forward(self.token, policy, batch, step), self.compiled
                )
        except Exception as exc:  # a breach inside a policy hook comes wrapped, naming policy and layer
            if self.compiled and _would_compile(exc):  # compile outside, record at the next occurrence
                return self._eager(token_ids, policy, batch, step, now)
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

    def _eager(
        self, token_ids: torch.Tensor, policy: Any, batch: Any, step: int, before: Fingerprint
    ) -> torch.Tensor:
        self.eager_steps += 1
        with self.adapter.routing():
            out = self.backend.eager(lambda: self.forward(token_ids, policy, batch, step))
        self.recorded_state = fingerprint(batch, policy)
        if self.recorded_state != before:  # the step allocated or moved state: recordings are stale
            self._drop()
        return out

    def _recording_checks(self) -> Any:
        if self.compiled:
            return torch.compiler.set_stance("fail_on_recompile")
        return HostReadGuard("a recorded decode step")

    def stats(self) -> dict[str, int]:
        return {"eager_steps": self.eager_steps, "recordings": self.recordings, "replays": self.replays}


def graph_decode_step(
    adapter: Any, forward: Callable[..., torch.Tensor] | None = None
) -> Callable[..., torch.Tensor]:
    """The adapter's decode step, replayed from recorded graphs (``generate(..., graphs=True)``).

    Same signature as ``adapter.decode_step``. ``forward``: a ``torch.compile(fullgraph=True)``-d
    ``adapter.decode_forward`` to record instead of the eager one
    (:func:`kvpolicy.generation.compiled_forward`; inductor's fused kernels inside the graph). The CPU
    stand-in records it too where this torch can trace through dynamo, else the eager forward."""

    def step(token_ids: torch.Tensor, policy: Any, batch: Any, step: int) -> torch.Tensor:
        adapter.prepare_step(batch, step)
        if batch.graphs is None:
            cuda = batch.next_positions.device.type == "cuda"
            compiled = forward is not None and (cuda or _TracedGraphs.traces_compiled())
            batch.graphs = DecodeGraphs(
                adapter, batch, forward if compiled else adapter.decode_forward, compiled
            )
        return batch.graphs.step(token_ids, policy, batch, step)

    return step
