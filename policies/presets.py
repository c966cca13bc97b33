"""The named presets ``fullkv``, ``snapkv`` and ``fastkv``: thin, validated builders of compositions.

Preset fields mirror the components' (see :class:`~kvpolicy.policies.tsp.TSP` and
:class:`~kvpolicy.policies.snapkv.SnapKV` for meanings and reference defaults); ``kv_budget`` is the
cache-budget override every compressing preset takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvpolicy.config import Budget
from kvpolicy.interfaces import Policy
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.policies.tsp import TSP
from kvpolicy.presets import Preset


class FullKVPreset(Preset):
    """Full context: no propagation cut, no cache compression."""

    kind = "fullkv"
    description = "full context: every token, every KV entry (baseline)"

    def build(self) -> Policy:
        return Policy(AllTokens(), FullCache())


class _SnapKVSettings(Preset):
    kv_budget: Budget = 0.1
    window: int = Field(8, ge=1)
    kernel: int = Field(7, ge=1)
    pooling: Literal["max", "avg"] = "max"

    def cache(self) -> SnapKV:
        return SnapKV(budget=self.kv_budget, window=self.window, kernel=self.kernel, pooling=self.pooling)


class SnapKVPreset(_SnapKVSettings):
    """SnapKV: window-attention cache compression at every layer, full prefill."""

    kind = "snapkv"
    description = "SnapKV cache compression at every layer (Li et al. 2024)"

    def build(self) -> Policy:
        return Policy(AllTokens(), self.cache())


class FastKVPreset(_SnapKVSettings):
    """FastKV: token-selective propagation plus independent SnapKV-style cache compression."""

    kind = "fastkv"
    description = "FastKV: TSP prefill cut + SnapKV-style cache (Jo et al. 2025)"

    tsp_layer: int | None = Field(None, ge=0)
    tsp_rate: float = Field(0.2, gt=0.0, le=1.0)
    tsp_length: int | None = Field(None, ge=1)

    def build(self) -> Policy:
        tsp = TSP(
            layer=self.tsp_layer,
            rate=self.tsp_rate,
            length=self.tsp_length,
            # A token budget is also the TSP floor: a prompt shorter than the budget is not cut.
            min_keep=self.kv_budget if isinstance(self.kv_budget, int) else None,
            window=self.window,
            kernel=self.kernel,
            pooling=self.pooling,
        )
        return Policy(tsp, self.cache())
