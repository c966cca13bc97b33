"""A seeded random cache baseline: each layer keeps, per KV head, ``budget`` entries drawn at random.

The floor every scoring method must beat: a method that keeps its budget no better than chance is
no method. The draw reads nothing of the model (no queries, keys, values or attention); it depends
only on ``seed``, the layer and how many entries are present, so a request always gets the same
choice, a prompt in a batch the same as alone, and two runs of one setting agree on any device.

Reference: kvpress ``kvpress/presses/random_press.py`` (``RandomPress``, github.com/NVIDIA/kvpress,
0.5.5): uniform scores ``torch.rand`` over ``(B, H_kv, T)``, the top ``n_kept`` kept. Deviations, and
why:

* kvpress's ``seed=None`` (its default) draws from torch's global RNG, so the choice changes with
  everything else that consumed it; with a seed, kvpress re-seeds one generator with that same seed
  at *every* layer (every layer of a request keeps the same indices, when the lengths agree), on the
  keys' device (CPU and CUDA generators give different numbers). Here there is always a seed (default
  0), and each layer draws from its own CPU generator seeded from ``(seed, layer)``
  (:func:`layer_generator`): layers differ from each other, rows of a batch equal their prompt alone,
  and the choice is the same on every device. Scores are float32 (kvpress: the keys' dtype).
* kvpress's ``compression_ratio`` (fraction removed, default 0.0 = keep everything) becomes ``budget``
  (fraction or count kept), default 0.1 like every other compressing policy of kvpolicy; a fractional
  budget never resolves below 8 entries (capped at the prompt), a token budget is kept exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: The fewest entries a fractional budget resolves to (SnapKV's default window's worth).
MIN_KEPT = 8

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit value from any integer."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def layer_generator(seed: int, layer: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, layer, stream)`` alone: the same numbers for the same
    triple in any process, whatever else drew from torch's global RNG. ``stream`` separates the draws
    of different policies that share a seed (0: :class:`Random`)."""
    mixed = _mix(_mix(_mix(seed) ^ (layer + 0x9E3779B97F4A7C15)) ^ stream)
    return torch.Generator(device="cpu").manual_seed(mixed & ((1 << 63) - 1))


def random_scores(batch: int, heads: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, heads, tokens)`` float32 uniform scores in ``[0, 1)``, on the CPU: one draw of
    ``(heads, tokens)`` from ``generator``, the same for every row (rows are independent requests)."""
    draw = torch.rand(heads, tokens, generator=generator, dtype=torch.float32)
    return draw.expand(batch, heads, tokens).clone()


class Random(SelectsTopScores, CachePolicy):
    """Keep ``budget`` entries per layer and KV head chosen uniformly at random (seeded).

    Attributes:
        budget: entries kept per layer and KV head: tokens (int, kept exactly) or a fraction of the
            prompt (float, ``int(L * r)`` but at least 8, at most ``L``). kvpress's
            ``compression_ratio`` is ``1 - budget``.
        seed: what the draws derive from, with the layer (:func:`layer_generator`); kvpress's
            ``seed`` (there ``None`` by default: torch's global RNG).
    """

    kind = "random"

    budget: Budget = 0.1
    seed: int = Field(0, ge=0)

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at 8)."""
        return resolve_budget(self.budget, prompt_len, floor=MIN_KEPT)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 uniform scores from ``(seed, layer)`` (none ``+inf``); the
        :class:`~kvpolicy.interfaces.ScoresKeys` contract."""
        b, h, t = view.key.shape[:3]
        scores = random_scores(b, h, t, layer_generator(self.seed, view.layer))
        return scores.to(view.key.device)


class RandomPreset(Preset):
    """Random: a seeded random choice of entries at every layer, full prefill (a baseline)."""

    kind = "random"
    description = "random baseline: a seeded random choice of KV entries per layer and head"

    kv_budget: Budget = 0.1
    seed: int = Field(0, ge=0)

    def cache(self) -> Random:
        return Random(budget=self.kv_budget, seed=self.seed)

    def build(self) -> Policy:
        return Policy(AllTokens(), self.cache())


__all__ = ["Random", "RandomPreset", "layer_generator", "random_scores"]
