"""Per-request state: everything that belongs to one generation, and nothing else.

Policies are immutable; what they need to remember between layers or decode steps (H2O's running
scores, a decode counter, ...) goes in :meth:`RequestState.scratch`, created fresh for each request.
Sharing a policy object across threads or interleaved requests is therefore safe.

A :class:`Batch` groups the requests that prefill and decode together (one prompt is a batch of
one): their shared cache, their next positions on the device, and the checks deferred out of the
decode loop.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpolicy.cache import KVPolicyCache


@dataclass
class RequestState:
    """State of one request (one sequence of a batch) through prefill and decode.

    Attributes:
        prompt_len: original prompt length ``L``.
        num_layers: decoder layers in the model.
        index: this request's row in its batch.
        max_new_tokens: decode room reserved at prefill (what decode-time state may be sized by).
        tokens_per_layer: tokens each layer processed during prefill (filled by the adapter).
        discarded_tokens_per_layer: tokens per layer of passes whose cache a ``Restart`` discarded
            (GemFilter's filter pass): prefill compute spent that ``tokens_per_layer`` omits.
        scoring_tokens: tokens the cache policy appended to the prompt to score with
            (:meth:`~kvpolicy.interfaces.CachePolicy.scoring_suffix`: KVzip's reconstruction), counted
            in ``tokens_per_layer``, never cached; ``scoring_segments``: their lengths, one per
            separate pass (each sees the prompt and itself only).
        batch: the :class:`Batch` this request decodes in, set at the end of prefill (by the
            :class:`Batch` itself when made). The request holds it weakly, the batch holds its requests:
            there is no cycle between them, so a batch and its cache (the KV pools, recorded graphs'
            memory) are freed as soon as the last reference to the batch goes, without waiting for the
            cyclic garbage collector. ``None`` before prefill, and once the batch was freed.
    """

    prompt_len: int
    num_layers: int
    index: int = 0
    max_new_tokens: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    discarded_tokens_per_layer: list[int] = field(default_factory=list)
    scoring_tokens: int = 0
    scoring_segments: tuple[int, ...] = ()
    _scratch: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _batch_ref: weakref.ref[Batch] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def batch(self) -> Batch | None:
        """The :class:`Batch` this request decodes in (held weakly), or ``None``."""
        ref = self._batch_ref
        return None if ref is None else ref()

    @batch.setter
    def batch(self, batch: Batch | None) -> None:
        self._batch_ref = None if batch is None else weakref.ref(batch)

    @property
    def cache(self) -> KVPolicyCache:
        """The batch's cache (this request's rows are :attr:`index`)."""
        batch = self.batch
        if batch is None:
            if self._batch_ref is not None:
                raise RuntimeError(
                    "this request's batch was freed: keep the Prefill (or its batch) while using its cache"
                )
            raise RuntimeError("this request has no cache yet: it is set at the end of prefill")
        return batch.cache

    def __deepcopy__(self, memo: dict[int, Any]) -> RequestState:
        """A deep copy whose :attr:`batch` is the copy of this request's batch made by the same
        ``deepcopy`` (copying a :class:`Batch` copies its requests), else ``None``: a request copied
        alone has no batch until one takes it."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        fields = {k: v for k, v in vars(self).items() if k != "_batch_ref"}
        new.__dict__.update(copy.deepcopy(fields, memo))
        batch = self.batch
        new._batch_ref = None
        if batch is not None and id(batch) in memo:
            new.batch = memo[id(batch)]
        return new

    def scratch(self, owner: object) -> dict[str, Any]:
        """A dict private to ``owner`` (a policy object) for this request."""
        return self._scratch.setdefault(id(owner), {})


#: What a deferred check found wrong, by its column in :attr:`Batch.flags`.
CHECKS = ("evicted slots outside [-1, length) or repeated", "kept slots outside [0, length)")


@dataclass
class Batch:
    """Requests decoded together: their states, their shared cache and their next positions.

    Attributes:
        states: one :class:`RequestState` per sequence, in batch order.
        cache: the batch's :class:`~kvpolicy.cache.KVPolicyCache`.
        next_positions: ``(B,)`` device tensor, the logical position of each sequence's next token.
        flags: ``(layers, len(CHECKS))`` device bools: what decode-time policies returned that was
            out of range, set in place inside decode steps and read once when the generation ends
            (:meth:`raise_deferred`), never inside a step.
        step_counter: ``()`` long device tensor, the decode step being run (what
            :attr:`~kvpolicy.interfaces.DecodeView.step_tensor` shows policies); set on the host before
            each step, outside any recorded graph, so a replayed step reads the current value.
        graphs: the batch's recorded decode graphs (:class:`kvpolicy.graphs.DecodeGraphs`), made by the
            graph path on first use and released with the batch.

    Making a batch points each of its requests' :attr:`RequestState.batch` at it (a weak reference:
    the batch owns its requests, not the reverse; see :class:`RequestState`).
    """

    states: list[RequestState]
    cache: KVPolicyCache
    next_positions: torch.Tensor
    flags: torch.Tensor | None = None
    graphs: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.flags is None:
            layers = len(self.cache.layers)
            self.flags = torch.zeros(
                (layers, len(CHECKS)), dtype=torch.bool, device=self.next_positions.device
            )
        self._scratch: dict[int, dict[Any, Any]] = {}
        self.step_counter = torch.zeros((), dtype=torch.long, device=self.next_positions.device)
        # one 0-d view per (layer, check): a deferred check is then two ops (any, or_), no indexing
        self._flag_views = [list(row.unbind(0)) for row in self.flags.unbind(0)]
        for state in self.states:
            state.batch = self

    def __deepcopy__(self, memo: dict[int, Any]) -> Batch:
        """A deep copy (cache, positions, flags, scratch, requests) whose requests point at the copy."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(vars(self), memo))
        for state in new.states:
            state.batch = new
        return new

    @property
    def size(self) -> int:
        return len(self.states)

    def set_step(self, step: int) -> None:
        """Host side, before a decode step: make :attr:`step_counter` read ``step`` (one small fill
        when it is not already there; the step itself advances it)."""
        if getattr(self, "_host_step", None) != step:
            self.step_counter.fill_(step)
        self._host_step = step + 1

    def scratch(self, owner: object) -> dict[Any, Any]:
        """A dict private to ``owner`` (a policy object) for this batch of requests (what a policy
        with ``decodes_batched`` keeps across decode steps; per-request state stays in ``states``)."""
        return self._scratch.setdefault(id(owner), {})

    def defer(self, layer: int, check: int, bad: torch.Tensor) -> None:
        """Record device-side flag ``bad`` (a bool tensor) for ``layer``; no host read."""
        self._flag_views[layer][check].logical_or_(bad.any())

    def raise_deferred(self, policy: Any) -> None:
        """Raise for the first deferred check that failed, naming ``policy`` (one host read)."""
        assert self.flags is not None
        found = self.flags.nonzero().tolist()
        self.flags.zero_()
        if found:
            from kvpolicy.adapters.base import AdapterError

            layer, check = found[0]
            raise AdapterError(
                f"policy {type(policy).__name__} ({policy.kind!r}) on_decode() at layer {layer}: {CHECKS[check]}"
            )
