"""The two hook interfaces every method is built from, and the views adapters hand them.

A model adapter owns the prefill layer loop (Overview: "Where each hook fires"). After each layer it
builds one :class:`LayerView` and asks

* the :class:`CachePolicy` which KV entries that layer keeps for decoding (per KV head), and
* the :class:`PropagationPolicy` which tokens go on to the next layer (or to restart the model on).

During decoding the adapter offers each layer's cache to :meth:`CachePolicy.on_decode`, a no-op by
default, for policies that keep evicting while generating.

Both interfaces are immutable pydantic settings (:class:`kvpolicy.config.Settings`) with pure
scoring; per-request scratch space comes from the :class:`~kvpolicy.state.RequestState` argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, runtime_checkable

import torch

from kvpolicy.config import Settings
from kvpolicy.scoring import window_attention
from kvpolicy.storage import KVStorage

if TYPE_CHECKING:
    from kvpolicy.state import Batch, RequestState


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
    _window_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, kw_only=True)
    #: Results one policy of a composition computed from this layer that the other may reuse (the
    #: cache policy is asked first, then the propagation policy). Keys: tuples starting with the
    #: producing policy's ``kind``; values depend only on this view and the key.
    shared: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    #: The model's RoPE base when its rotary embedding is plain RoPE over the whole head (no scaling,
    #: no partial rotation, one kind for every layer), else ``None``: what a policy that undoes RoPE
    #: (ExpectedAttention) may rely on.
    rope_theta: float | None = None
    #: The model's own rotary embedding for this layer, whatever its type (scaled, partial, per layer):
    #: ``rotary(positions)`` with ``positions`` ``(B, n)`` long gives ``(cos, sin)``, each
    #: ``(B, n, d_rot)`` as the model applies them (``d_rot`` the rotated width). ``None`` when the
    #: model has no rotary embedding or the adapter cannot reach it. What a policy that moves queries or
    #: keys to other positions (ExpectedAttention) uses instead of assuming plain RoPE.
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: ``(D, H_q * d_v)`` weight of this layer's attention output projection (``o_proj``), or ``None``
    #: when the adapter cannot name it: what output-error-aware scoring (CriticalKV) weighs values by.
    out_proj: torch.Tensor | None = None

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


#: :meth:`CachePolicy.decode_variant`'s answer for a step that must run eagerly (not recorded).
EAGER_STEP: Final = "kvpolicy-eager-step"


@dataclass
class DecodeView:
    """One layer's cache for one sequence during a decode step, after the new token was appended.

    The cache is ragged per KV head and addressed by *slot*: head ``h`` holds its entries in slots
    ``0..lengths[h]-1`` in no particular order (each slot stores its entry's original position);
    ``S`` is the slots addressable this step, the same every step until the cache grows. Everything
    here is a device tensor of static shape, so a policy written with tensor ops (``torch.where``,
    masks, ``topk``) over slots keeps the decode step free of host syncs and compilable.

    Attributes:
        layer: index of this layer.
        num_layers: number of decoder layers.
        prompt_len: original prompt length.
        step: how many tokens were generated before this one (0 for the first decode step). A host
            int: under graph-replayed decode it is the value at the step that was recorded, so use it
            only for decisions that :meth:`CachePolicy.decode_variant` also makes (the graph path
            records one graph per variant); tensor math that depends on the step reads
            :attr:`step_tensor`.
        query: ``(1, H_q, 1, d)`` the new token's query, after RoPE.
        attention: ``(1, H_kv, n_rep, S)`` float32: the new query's attention over the slots, as the
            decode step computed it (zero on empty slots).
        positions: ``(1, H_kv, S)`` original position of each slot's entry (``-1`` when empty).
        lengths: ``(1, H_kv)`` entries per KV head (the new one included).
        scaling: softmax scale.
        step_tensor: ``()`` long device tensor holding ``step``, current under graph replay too.
    """

    layer: int
    num_layers: int
    prompt_len: int
    step: int
    query: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    scaling: float
    _dense: Any = field(default=None, repr=False, kw_only=True)  # engine-internal: keyword only
    #: the prompt length of each row (``(prompt_len,)`` for a one-sequence view).
    prompt_lens: tuple[int, ...] = ()
    step_tensor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.prompt_lens:
            self.prompt_lens = (self.prompt_len,)

    @property
    def num_slots(self) -> int:
        return self.positions.shape[-1]

    @property
    def valid(self) -> torch.Tensor:
        """``(1, H_kv, S)`` bool: which slots hold an entry."""
        return self.positions >= 0

    @property
    def key(self) -> torch.Tensor:
        """``(1, H_kv, S, d)`` keys by slot (a gather of the paged cache: costs a copy; prefer scores)."""
        return self._dense("key")

    @property
    def value(self) -> torch.Tensor:
        """``(1, H_kv, S, d_v)`` values by slot (a copy, as :attr:`key`)."""
        return self._dense("value")


@dataclass(frozen=True)
class PerHead:
    """A selection whose KV heads keep different numbers of entries (head-adaptive budgets).

    ``indices``: ``(B, H_kv, C)`` indices into the tokens present; head ``h`` keeps its first
    ``counts[b, h]`` (the rest of its row is ignored). ``counts``: ``(B, H_kv)``, each in ``[1, C]``.
    The cache stores exactly ``counts`` entries per head (pages, not a padded rectangle)."""

    indices: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class Evict:
    """Decode-time eviction in place: free these cache slots. ``slots``: ``(B, H_kv, k)`` slot indices
    (``-1``: none), distinct per head. Each freed slot takes its head's last entry, so policies that
    keep slot-indexed state mirror the move with :func:`kvpolicy.cache.evict_rows`."""

    slots: torch.Tensor


Selection = torch.Tensor | PerHead | None
DecodeDecision = torch.Tensor | PerHead | Evict | None


@dataclass(frozen=True)
class Propagate:
    """Only these tokens go on to the next layer. ``indices``: ``(B, T')`` sorted indices into the
    tokens present at this layer. They keep their original positions (as in FastKV)."""

    indices: torch.Tensor


@dataclass(frozen=True)
class Restart:
    """Run the whole model again on these prompt tokens, with fresh positions ``0..k-1``.

    ``indices``: ``(B, k)`` sorted indices into the *original prompt*. The cache built so far is
    discarded; the second pass has no propagation (as in GemFilter)."""

    indices: torch.Tensor


PropagationDecision = Propagate | Restart | None


class PropagationPolicy(Settings, ABC):
    """During prefill, which tokens continue to the next layer.

    Implement :meth:`propagate`; return ``None`` to keep every token.
    """

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the bad setting if it cannot apply to a model of this depth."""

    def check_composition(self, cache: CachePolicy) -> None:
        """Raise ``ValueError`` naming the settings if this policy cannot compose with ``cache``."""

    def decision_layers(self, num_layers: int) -> Collection[int] | None:
        """The layers after which :meth:`propagate` may cut, for a model of ``num_layers`` layers
        (``None``, the default: any layer, or not known).

        Why: on a hybrid model (Qwen3-Next, Jamba, ...) :meth:`propagate` runs only after attention
        layers, since recurrent and convolution layers have no queries and keys to score; a policy
        that names its layer here is refused up front, naming the layers that attend, when its layer
        is not one of them, instead of silently never cutting."""
        return None

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

    :meth:`select` runs once per layer at prefill, for one sequence (``B = 1``): it returns
    ``(B, H_kv, C)`` indices (every KV head keeps ``C`` entries of its own choosing), a
    :class:`PerHead` selection (a different count per head), or ``None`` to keep everything.
    :meth:`on_decode` runs after each decode step (no-op by default) and returns an :class:`Evict`
    (slots freed in place: O(1), the fast path), or indices / :class:`PerHead` of the slots to keep
    (the layer is compacted), or ``None``. Write it with tensor ops only (no ``.item()``, ``int()``
    on tensors, Python branches on tensor values): a decode step must not wait for the device.
    """

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the bad setting if it cannot apply to a model of this depth."""

    def check_composition(self, propagation: PropagationPolicy) -> None:
        """Raise ``ValueError`` naming the settings if this policy cannot compose with ``propagation``."""

    @abstractmethod
    def select(self, view: LayerView, state: RequestState) -> Selection:
        """Indices into the tokens present at this layer, per KV head, or ``None`` for all."""

    #: ``True``: :meth:`on_decode` takes the whole batch in one call (the view has ``B`` rows,
    #: ``view.prompt_lens`` one per row, and ``state`` is the :class:`~kvpolicy.state.Batch`, whose
    #: ``scratch`` is the batch's and whose ``states`` are its requests) and returns only
    #: :class:`Evict` ``(B, H_kv, k)`` or ``None``. One call per layer instead of one per sequence:
    #: a decode step is dozens of small ops per call, which a batch of eight multiplies by eight.
    decodes_batched: ClassVar[bool] = False

    def on_decode(self, view: DecodeView, state: RequestState) -> DecodeDecision:
        """Slots to evict (:class:`Evict`) or to keep after a decode step, or ``None``.

        Graph-replayed decode (``generate(..., graphs=True)``) records a whole step once and replays
        it, so what this method does must be the same device work every step of a variant
        (:meth:`decode_variant`): state it keeps across steps is allocated at the first decode step
        (which always runs eagerly) or at prefill, and then updated *in place* (``copy_``,
        ``index_copy_``, ``+=``), never rebound to a new tensor; a Python value that changes per step
        never reaches tensor code (read :attr:`DecodeView.step_tensor` instead). The graph path checks
        this and names the policy and scratch entry when it is broken
        (``docs/authoring/decode-eviction.md``)."""
        return None

    def decode_variant(self, step: int, batch: Batch) -> Hashable:
        """Host-side, before decode step ``step`` of ``batch``: which code path the step takes, as a
        hashable (``None``: always the same). Steps of different variants run different device work
        (PyramidInfer squeezes every ``interval`` steps and only records attention in between), so the
        graph path records and replays one graph per variant. Return :data:`EAGER_STEP` for a step that
        changes host-side state or reallocates scratch (it then runs eagerly and the graphs are
        recorded anew after it). Read only host facts: settings, ``step``, shapes of scratch."""
        return None

    @property
    def evicts_during_decode(self) -> bool:
        return type(self).on_decode is not CachePolicy.on_decode

    # -- optional prefill hooks: a scoring pass, and selections made once every layer has run ---------

    def with_tokenizer(self, tokenizer: Any) -> CachePolicy:
        """This policy bound to the tokenizer of the model it will run on (default: itself).

        Why: a policy whose scoring pass is made of text (KVzip's "Repeat the previous context") needs
        that text's token ids, and the chat template's; settings are tokenizer-free data, so
        :func:`kvpolicy.generate` asks for the bound form before prefill. Return a copy; never keep
        the tokenizer on the policy beyond ids."""
        return self

    def scoring_suffix(
        self, prompt: torch.Tensor, state: RequestState
    ) -> torch.Tensor | list[torch.Tensor] | None:
        """Tokens ``(S,)`` the engine appends to this sequence's prompt ``(L,)`` for the policy to
        score with, or a list of such segments, or ``None`` (the default).

        Why: some scores come from a pass the prompt alone does not make (KVzip asks the model to
        repeat its context and scores each KV entry by the attention the repetition pays it). The
        suffix runs through every layer with the prompt, its queries attending to the whole prompt
        and causally to itself, exactly as a second pass over a full cache would; its KV is never
        cached and decoding continues from the prompt's last token, at position ``L``. Its work is
        prefill work (``tokens_per_layer`` counts it). :meth:`select` then sees ``L + S`` tokens and
        must pick among the first ``L`` (``None``: all of them). Not offered with a propagation cut.

        Segments of a list are separate passes: each attends to the whole prompt and causally to
        itself, never to another segment, and each is numbered from position ``L`` on (what one pass
        per segment over the prompt's cache computes: KVzip's chunked reconstruction). They follow
        each other after the prompt, in order, in the view's tokens."""
        return None

    def finish_prefill(self, state: RequestState) -> Mapping[int, Selection] | None:
        """After the last layer: each layer's final selection, ``{layer: Selection}``, or ``None``.

        For policies that allocate one budget across layers (KVzip ranks every layer's entries
        together): while this method is overridden, the engine holds what each layer's
        :meth:`select` kept instead of caching it, and caches the selection given here, indices into
        those entries (a layer missing from the mapping keeps them all). Peak memory is then that of
        the held entries, as a full cache's."""
        return None

    @property
    def selects_after_prefill(self) -> bool:
        return type(self).finish_prefill is not CachePolicy.finish_prefill


@runtime_checkable
class ScoresKeys(Protocol):
    """A cache policy whose prefill selection is a ranking of keys, exposed for reuse.

    Policies that allocate a budget differently from the one that scores (head-adaptive budgets,
    :class:`~kvpolicy.policies.adakv.AdaKV`) take the scores from here instead of reimplementing each
    scoring method. ``isinstance(policy, ScoresKeys)`` checks that both methods exist.
    """

    def key_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, T)`` float scores of the keys present at this layer, higher is kept first;
        entries the policy always keeps (its observation window) score ``+inf``."""
        ...

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries per KV head the policy keeps for a prompt of ``prompt_len`` tokens."""
        ...


@dataclass(frozen=True)
class Policy:
    """A composition of one propagation policy and one cache policy: what ``generate`` runs.

    Build one with :func:`kvpolicy.compose` or get a named preset with :func:`kvpolicy.get_policy`.
    Two policies are equal when their parts are: ``name`` is a label (the preset's), so a preset equals
    the same composition made by hand.
    """

    propagation: PropagationPolicy
    cache: CachePolicy
    name: str | None = field(default=None, compare=False)
    #: how each kept entry is stored (:class:`~kvpolicy.storage.KVStorage`): independent of which entries
    #: the policies keep, so any composition takes any width; 16 bits (the default) is the model's dtype.
    storage: KVStorage = field(default_factory=KVStorage)

    def __post_init__(self) -> None:
        if not isinstance(self.propagation, PropagationPolicy):
            raise TypeError(
                f"propagation must be a PropagationPolicy, got {type(self.propagation).__name__}: "
                f"{self.propagation!r}"
            )
        if not isinstance(self.cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy, got {type(self.cache).__name__}: {self.cache!r}")
        # Components that depend on each other's settings say so (the core knows none by name).
        self.propagation.check_composition(self.cache)
        self.cache.check_composition(self.propagation)

    def check_model(self, num_layers: int) -> None:
        self.propagation.check_model(num_layers)
        self.cache.check_model(num_layers)

    def with_tokenizer(self, tokenizer: Any) -> Policy:
        """This composition with its cache policy bound to ``tokenizer`` (:meth:`CachePolicy.with_tokenizer`)."""
        cache = self.cache.with_tokenizer(tokenizer)
        return self if cache is self.cache else Policy(self.propagation, cache, self.name, self.storage)

    def with_storage(self, storage: Any) -> Policy:
        """This composition storing entries as ``storage`` says (a :class:`~kvpolicy.storage.KVStorage`,
        or what :meth:`KVStorage.parse <kvpolicy.storage.KVStorage.parse>` reads: ``4``, ``"fp8"``...)."""
        return Policy(self.propagation, self.cache, self.name, KVStorage.parse(storage))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :func:`kvpolicy.registry.policy_from_dict` reverses it."""
        out = {"name": self.name, "propagation": self.propagation.to_dict(), "cache": self.cache.to_dict()}
        if self.storage.quantized:  # 16-bit policies keep the form (and result keys) they always had
            out["storage"] = self.storage.to_dict()
        return out

    def describe(self) -> str:
        def one(s: Settings) -> str:
            args = ", ".join(f"{k}={v}" for k, v in s.model_dump().items())
            return f"{type(s).__name__}({args})"

        head = f"{self.name}: " if self.name else ""
        tail = f" @ {self.storage.label} KV" if self.storage.quantized else ""
        return f"{head}{one(self.propagation)} + {one(self.cache)}{tail}"
