"""The ``keynorm`` preset: full prefill, key-norm cache compression at every layer."""

from __future__ import annotations

from kvpolicy.config import Budget
from kvpolicy.interfaces import Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from pydantic import Field

from kvpolicy_keynorm.policy import KeyNorm


class KeyNormPreset(Preset):
    """Key-norm cache compression: keep each layer's lowest-norm keys per KV head.

    ``kv_budget`` is the cache budget every preset takes (tokens or a fraction of the prompt);
    ``window`` keeps that many recent entries whatever their norm.
    """

    kind = "keynorm"
    description = "KeyNorm: keep the lowest-L2-norm keys per KV head (Devoto et al. 2024)"

    kv_budget: Budget = 0.5
    window: int = Field(0, ge=0)

    def build(self) -> Policy:
        # KeyNorm validates the pair (window vs budget); get_policy turns its error into one
        # naming the preset.
        return Policy(AllTokens(), KeyNorm(budget=self.kv_budget, window=self.window))
