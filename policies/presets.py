"""The named presets ``fullkv``, ``snapkv`` and ``fastkv``: thin, validated builders of compositions.

Preset fields mirror the components' (see :class:`~kvpolicy.policies.tsp.TSP` and
:class:`~kvpolicy.policies.snapkv.SnapKV` for meanings and reference defaults); ``kv_budget`` is the
cache-budget override every compressing preset takes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kvpolicy.config import Budget, Settings
from kvpolicy.interfaces import CachePolicy, Policy
from kvpolicy.policies.full import AllTokens, FullCache
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.policies.tsp import TSP, default_tsp_layer
from kvpolicy.presets import Preset


class CachePreset(Preset):
    """A preset that runs one cache policy at every layer after a full prefill, its settings the
    policy's own (a settings class both inherit: :attr:`settings_class`) plus ``kv_budget`` (the
    policy's ``budget``). Subclasses declare ``kv_budget`` themselves, so it lists first.

    Why: the query-agnostic scorers' presets (ExpectedAttention, LagKV, Compactor, Q-Filters) are this
    and nothing more; the building is written once."""

    #: The cache policy the preset builds.
    policy_class: ClassVar[type[CachePolicy]]
    #: The settings the policy and the preset share.
    settings_class: ClassVar[type[Settings]]

    def cache(self) -> CachePolicy:
        shared = self.model_dump(include=set(self.settings_class.model_fields))
        return self.policy_class(budget=self.kv_budget, **shared)  # type: ignore[attr-defined,call-arg]

    def build(self) -> Policy:
        return Policy(AllTokens(), self.cache())


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


#: Tokens that propagate past the TSP layer in the reference's constant mode (its ``tsp_len``).
DEFAULT_TSP_LENGTH = 2048


class FastKVPreset(_SnapKVSettings):
    """FastKV: token-selective propagation plus independent SnapKV-style cache compression.

    How many tokens propagate follows the FastKV reference code (github.com/dongwonjo/FastKV), which pairs
    its two TSP modes with its two budget modes:

    * ``kv_budget`` a fraction (default 0.1): proportional TSP, ``int(L * tsp_rate)`` tokens
      (``tsp_rate`` default 0.2);
    * ``kv_budget`` a token count, with neither ``tsp_length`` nor ``tsp_rate`` given: constant TSP,
      ``tsp_length`` = 2048 tokens (the reference's default ``tsp_len``). A constant cache budget
      with a proportional cut would propagate ever more tokens as prompts grow (about 26K at 128K
      with rate 0.2), which is not what the reference measures;
    * ``tsp_length`` or an explicitly given ``tsp_rate`` always wins (``tsp_length`` over ``tsp_rate``).

    With a token ``kv_budget`` TSP never propagates fewer tokens than that budget (later layers could
    not hold it otherwise), so a prompt shorter than the budget is not cut.
    """

    kind = "fastkv"
    description = "FastKV: TSP prefill cut + SnapKV-style cache (Jo et al. 2025)"

    tsp_layer: int | None = Field(None, ge=0)
    tsp_rate: float = Field(0.2, gt=0.0, le=1.0)
    tsp_length: int | None = Field(None, ge=1)

    def resolved_tsp_length(self) -> int | None:
        """The constant TSP length, or ``None`` for proportional mode (see the class docstring).

        ``model_fields_set`` tells a ``tsp_rate`` the user gave (even 0.2) from the default.
        """
        if self.tsp_length is not None:
            return self.tsp_length
        if isinstance(self.kv_budget, int) and "tsp_rate" not in self.model_fields_set:
            return max(DEFAULT_TSP_LENGTH, self.window)  # TSP keeps its window, whatever its length
        return None

    def resolved_settings(self, num_layers: int | None = None) -> dict[str, Any]:
        out = super().resolved_settings(num_layers)
        if out["tsp_layer"] is None and num_layers:
            out["tsp_layer"] = default_tsp_layer(num_layers)
        out["tsp_length"] = self.resolved_tsp_length()
        return out

    def build(self) -> Policy:
        tsp = TSP(
            layer=self.tsp_layer,
            rate=self.tsp_rate,
            length=self.resolved_tsp_length(),
            # A token budget is also the TSP floor: a prompt shorter than the budget is not cut.
            min_keep=self.kv_budget if isinstance(self.kv_budget, int) else None,
            window=self.window,
            kernel=self.kernel,
            pooling=self.pooling,
        )
        return Policy(tsp, self.cache())
