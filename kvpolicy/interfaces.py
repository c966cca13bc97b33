"""The two hook interfaces every method is built from, and the views adapters hand them.

A model adapter owns the prefill layer loop (design-notes §1). After each layer it builds one
:class:`LayerView` and asks

* the :class:`CachePolicy` which KV entries that layer keeps for decoding (per KV head), and
* the :class:`PropagationPolicy` which tokens go on to the next layer (or to restart the model on).

During decoding the adapter offers each layer's cache to :meth:`CachePolicy.on_decode`, a no-op by
default, for policies that keep evicting while generating.

Both interfaces are immutable pydantic settings (:class:`kvpolicy.config.Settings`) with pure
scoring; per-request scratch space comes from the :class:`~kvpolicy.state.RequestState` argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.config import Settings
from kvpolicy.scoring import window_attention

if TYPE_CHECKING:
    from kvpolicy.state import RequestState


@dataclass
class LayerView:
    """What one prefill layer exposes to the policies, after its attention and MLP ran.

    Shapes: ``B`` batch, ``T`` tokens present at this layer, ``H_q``/``H_kv`` query/KV heads, ``d``
    head dim. ``query``/``key`` are after RoPE; ``key``/``value`` are at KV-head granularity.

    Attributes:
        layer: index of this layer, 0-based.
        num_layers: number of decoder layers in the model.
        prompt_len: original prompt length ``L`` (budgets given as fractions resolve against it).
        positions: ``(B, T)`` original position of each token present.
        query: ``(B, H_q, T, d)``.
        key: ``(B, H_kv, T, d)``.
        value: ``(B, H_kv, T, d)``.
        scaling: softmax scale of the attention (``1/sqrt(d)`` for Llama).
    """

    layer: int
    num_layers: int
    prompt_len: int
    positions: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    _window_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.key.shape[-2]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    def window_attention(self, window: int) -> torch.Tensor:
        """Shared SnapKV-style window scores, computed once per window size and reused.

        Returns ``(B, H_kv, n_rep, T)`` float32: softmax attention of the last ``window`` queries over
        all keys present, summed over those queries (see :func:`kvpolicy.scoring.window_attention`).
        Both policies of a composition that ask for the same window share one computation.
        """
        window = min(window, self.num_tokens)
        if window not in self._window_cache:
            self._window_cache[window] = window_attention(self.query, self.key, window, self.scaling)
        return self._window_cache[window]


@dataclass
class DecodeView:
    """One layer's cache during a decode step, after the new token was appended.

    Attributes:
        layer: index of this layer.
        num_layers: number of decoder layers.
        prompt_len: original prompt length.
        step: how many tokens were generated before this one (0 for the first decode step).
        query: ``(B, H_q, 1, d)`` the new token's query, after RoPE.
        key: ``(B, H_kv, n, d)`` every cached key of this layer, the new one last.
        value: ``(B, H_kv, n, d)``.
        positions: ``(B, H_kv, n)`` original position of each cached entry.
        scaling: softmax scale.
    """

    layer: int
    num_layers: int
    prompt_len: int
    step: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class Propagate:
    """Only these tokens go on to the next layer. ``indices``: ``(B, T')`` sorted indices into the
    tokens present at this layer. They keep their original positions (methods.md, FastKV)."""

    indices: torch.Tensor


@dataclass(frozen=True)
class Restart:
    """Run the whole model again on these prompt tokens, with fresh positions ``0..k-1``.

    ``indices``: ``(B, k)`` sorted indices into the *original prompt*. The cache built so far is
    discarded; the second pass has no propagation (GemFilter, methods.md)."""

    indices: torch.Tensor


PropagationDecision = Propagate | Restart | None


class PropagationPolicy(Settings, ABC):
    """During prefill, which tokens continue to the next layer.

    Implement :meth:`propagate`; return ``None`` to keep every token.
    """

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the bad setting if it cannot apply to a model of this depth."""

    def needs_cache(self, view: LayerView, state: RequestState) -> bool:
        """Whether layer ``view.layer`` of this pass needs a KV cache (default ``True``).

        Return ``False`` for layers whose cache a coming :class:`Restart` discards anyway (GemFilter's
        filter pass): the adapter then neither asks the cache policy nor stores that layer's KV. A
        policy that says ``False`` must restart before the pass ends. Not asked in a restarted pass.
        """
        return True

    @abstractmethod
    def propagate(self, view: LayerView, state: RequestState) -> PropagationDecision:
        """Decide after layer ``view.layer`` which tokens the next layer processes."""


class CachePolicy(Settings, ABC):
    """Which KV entries each layer keeps for decoding.

    :meth:`select` runs once per layer at prefill; :meth:`on_decode` after each decode step (no-op by
    default). Both return ``(B, H_kv, C)`` indices, each KV head choosing its own entries, with the
    same count ``C`` for every head so the cache stays rectangular; ``None`` keeps everything.
    """

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the bad setting if it cannot apply to a model of this depth."""

    @abstractmethod
    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        """Indices into the tokens present at this layer, per KV head, or ``None`` for all."""

    def on_decode(self, view: DecodeView, state: RequestState) -> torch.Tensor | None:
        """Indices into the layer's current cache entries to keep after a decode step, or ``None``."""
        return None

    @property
    def evicts_during_decode(self) -> bool:
        return type(self).on_decode is not CachePolicy.on_decode


@dataclass(frozen=True)
class Policy:
    """A composition of one propagation policy and one cache policy: what ``generate`` runs.

    Build one with :func:`kvpolicy.compose` or get a named preset with :func:`kvpolicy.get_policy`.
    """

    propagation: PropagationPolicy
    cache: CachePolicy
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.propagation, PropagationPolicy):
            raise TypeError(
                f"propagation must be a PropagationPolicy, got {type(self.propagation).__name__}: "
                f"{self.propagation!r}"
            )
        if not isinstance(self.cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy, got {type(self.cache).__name__}: {self.cache!r}")

    def check_model(self, num_layers: int) -> None:
        self.propagation.check_model(num_layers)
        self.cache.check_model(num_layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :func:`kvpolicy.registry.policy_from_dict` reverses it."""
        return {
            "name": self.name,
            "propagation": self.propagation.to_dict(),
            "cache": self.cache.to_dict(),
        }

    def describe(self) -> str:
        def one(s: Settings) -> str:
            args = ", ".join(f"{k}={v}" for k, v in s.model_dump().items())
            return f"{type(s).__name__}({args})"

        head = f"{self.name}: " if self.name else ""
        return f"{head}{one(self.propagation)} + {one(self.cache)}"
