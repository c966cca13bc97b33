"""The FastKV paper's baselines as named presets: ``streamingllm``, ``h2o``, ``pyramidkv``, ``gemfilter``
and ``pyramidinfer``. Each builds one propagation policy and one cache policy; see the components
(:mod:`kvpolicy.policies.streamingllm`, ``h2o``, ``pyramidkv``, ``gemfilter``, ``pyramidinfer``) for
what each setting means, the reference defaults and where kvpolicy departs from the reference.

Every preset takes ``kv_budget`` (tokens or a fraction of the prompt) as its cache-budget override.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kvpolicy.config import Budget
from kvpolicy.interfaces import CachePolicy, Policy
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.policies.gemfilter import GemFilter, default_filter_layer
from kvpolicy.policies.h2o import H2O
from kvpolicy.policies.presets import _SnapKVSettings
from kvpolicy.policies.pyramidinfer import CONFIGS, PyramidInfer, PyramidInferSqueeze
from kvpolicy.policies.pyramidkv import PyramidKV
from kvpolicy.policies.streamingllm import StreamingLLM
from kvpolicy.presets import Preset


class StreamingLLMPreset(Preset):
    """StreamingLLM: attention sinks plus the most recent tokens, full prefill."""

    kind = "streamingllm"
    description = "StreamingLLM: 4 attention sinks + recent window (Xiao et al. 2024)"

    kv_budget: Budget = 0.1
    sinks: int = Field(4, ge=0)
    rolling: bool = False

    def build(self) -> Policy:
        return Policy(
            AllTokens(), StreamingLLM(budget=self.kv_budget, sinks=self.sinks, rolling=self.rolling)
        )


class H2OPreset(Preset):
    """H2O: heavy hitters over all queries' causal attention plus a recent window, full prefill."""

    kind = "h2o"
    description = "H2O: heavy-hitter + recent-window cache (Zhang et al. 2023)"

    kv_budget: Budget = 0.1
    window: int = Field(8, ge=1)
    evict_during_decode: bool = False

    def build(self) -> Policy:
        cache = H2O(budget=self.kv_budget, window=self.window, evict_during_decode=self.evict_during_decode)
        return Policy(AllTokens(), cache)


class PyramidKVPreset(_SnapKVSettings):
    """PyramidKV: SnapKV selection with budgets decreasing linearly with depth, full prefill."""

    kind = "pyramidkv"
    description = "PyramidKV: SnapKV scoring, pyramid of per-layer budgets (Cai et al. 2024)"

    beta: int = Field(20, ge=1)

    def build(self) -> Policy:
        cache = PyramidKV(
            budget=self.kv_budget,
            window=self.window,
            kernel=self.kernel,
            pooling=self.pooling,
            beta=self.beta,
        )
        return Policy(AllTokens(), cache)


class GemFilterPreset(Preset):
    """GemFilter: an early layer selects the tokens, then the whole model reruns on them.

    ``kv_budget`` is the number of tokens the filter keeps, hence what every layer caches.

    Attributes:
        kv_budget: tokens the filter layer keeps and the rerun caches at every layer: tokens (int) or a
            fraction of the prompt (float).
        filter_layer: the filter layer (0-based); ``None`` means the reference's table (13 of 32, 17
            of 36, 19 of 40), interpolated for other depths.
        kernel: average-pooling kernel along the tokens (odd).
    """

    kind = "gemfilter"
    description = "GemFilter: early-layer token filter + rerun on the kept tokens (Shi et al. 2024)"

    kv_budget: Budget = 0.1
    filter_layer: int | None = Field(None, ge=0)
    kernel: int = Field(5, ge=1)

    def resolved_settings(self, num_layers: int | None = None) -> dict[str, Any]:
        out = super().resolved_settings(num_layers)
        if out["filter_layer"] is None and num_layers:
            out["filter_layer"] = default_filter_layer(num_layers)
        return out

    def build(self) -> Policy:
        return Policy(
            GemFilter(keep=self.kv_budget, layer=self.filter_layer, kernel=self.kernel), FullCache()
        )


class PyramidInferPreset(Preset):
    """PyramidInfer: layer-by-layer context pruning at prefill, squeezing while decoding.

    Without ``kv_budget`` the schedule is the reference configuration ``config`` (mean KV retention
    35, 50 or 60 % of the prompt on 32 layers), with ``recent_ratio``/``decay`` overriding its
    values. With ``kv_budget`` (a fraction, or tokens), ``decay`` is solved per prompt so that the
    mean retention over layers is ``kv_budget``; ``recent_ratio`` then defaults to the reference's
    pairing (0.2 for fractions of at least 0.5, else 0.01). PyramidInfer cannot go below about a
    third of the prompt: smaller budgets use ``decay = 0`` and warn.

    Attributes:
        kv_budget: mean KV retention over layers to reach (a fraction, or tokens); ``None`` uses the
            reference configuration ``config``.
        config: the reference configuration by mean retention on 32 layers: "35", "50" or "60" (%).
        recent_ratio: the recent window, the last ``1 + int(L * recent_ratio)`` prompt tokens, never
            pruned (``None``: the configuration's or the budget's pairing).
        decay: floor of the prefill pruning's cosine schedule over depth (``None``: the
            configuration's, or solved from ``kv_budget``).
        squeeze: also compress while decoding (PyramidInferSqueeze); ``False`` keeps the prefill cache.
        sinks: first prompt positions never pruned.
        distance_weight: weight of the newest recent query relative to the oldest in the scores.
        min_context: a layer whose pruned context would not exceed this many tokens prunes nothing.
        decode_interval: entries that must leave the recent window before a decode squeeze (16).
        decode_ratio: fraction of them a squeeze keeps before the depth decay (0.9).
        decode_decay: depth decay of the kept count while decoding; 1 keeps the same count at every
            layer.
    """

    kind = "pyramidinfer"
    description = "PyramidInfer: layer-wise context pruning + decode squeeze (Yang et al. 2024)"

    kv_budget: Budget | None = None
    config: Literal["35", "50", "60"] = "35"
    recent_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    decay: float | None = Field(None, ge=0.0, le=1.0)
    squeeze: bool = True
    sinks: int = Field(4, ge=0)
    distance_weight: float = Field(1.2, gt=0.0)
    min_context: int = Field(64, ge=0)
    decode_interval: int = Field(16, ge=1)
    decode_ratio: float = Field(0.9, gt=0.0, le=1.0)
    decode_decay: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> PyramidInferPreset:
        if self.kv_budget is not None and self.decay is not None:
            raise ValueError(
                f"give kv_budget ({self.kv_budget}) or decay ({self.decay}), not both: "
                "decay is solved from kv_budget"
            )
        return self

    def build(self) -> Policy:
        recent, decay = CONFIGS[self.config]
        target = None
        if self.kv_budget is not None:
            big = isinstance(self.kv_budget, float) and self.kv_budget >= 0.5
            recent, decay, target = (0.2 if big else 0.01), None, self.kv_budget
        elif self.decay is not None:
            decay = self.decay
        if self.recent_ratio is not None:
            recent = self.recent_ratio
        propagation = PyramidInfer(
            recent_ratio=recent,
            decay=decay,
            target=target,
            sinks=self.sinks,
            distance_weight=self.distance_weight,
            min_context=self.min_context,
        )
        cache: CachePolicy = FullCache()
        if self.squeeze:
            cache = PyramidInferSqueeze(
                recent_ratio=recent,
                interval=self.decode_interval,
                ratio=self.decode_ratio,
                decay=self.decode_decay,
                distance_weight=self.distance_weight,
            )
        return Policy(propagation, cache)
