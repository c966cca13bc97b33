"""LagKV cache compression (Liang et al. 2025, arXiv 2504.04704), as NVIDIA kvpress runs it.

Query-agnostic and attention-free: the entries after the sinks are cut into partitions of
``lag_size`` tokens, and each partition is judged against the *next* one (its "lag" reference). Per
channel, a partition's keys are min-max normalised by the next partition's minimum and maximum; the
standard deviation over the channels of a normalised key measures how much it stands out from what
follows, and a softmax over the partition's tokens turns that into a score. Values are scored the
same way and the two averaged. By default each partition then ranks its own tokens (``rank /
lag_size``), so every partition keeps about the same share of the budget; ``cross_scoring`` keeps the
softmax scores themselves, comparable across partitions (and heads: kvpress suggests it with Ada-KV).
The first ``n_sink`` entries are always kept, and the last partition with the remainder (the tail,
``lag_size`` to ``2 * lag_size - 1`` tokens, which has no reference) ranks above every partition.

Defaults and reference: kvpress ``kvpress/presses/lagkv_press.py`` (``LagKVPress``,
github.com/NVIDIA/kvpress, 0.5.5): ``n_sink=4``, ``lag_size=128``, ``cross_scoring=False``; the keys
and values as the cache holds them (keys after RoPE); a prompt shorter than ``n_sink + 2 * lag_size``
is not scored, only ranked by recency (the most recent entries kept, as kvpress's ``arange`` scores).
kvpress's ``compression_ratio`` (fraction removed, default 0.0 = compress nothing) becomes ``budget``
(fraction or count kept), default 0.1 like every other compressing policy of kvpolicy.

Deviations, and why:

* kvpress scores the sinks and the tail 1, the same as each other, above every partition score, and
  leaves it to ``topk``'s tie order which of them a budget smaller than both keeps. Here the sinks
  score ``+inf`` (the :class:`~kvpolicy.interfaces.ScoresKeys` contract for entries always kept) and
  the tail ``1 + rank / tail_len`` by recency, still above every partition score, so a budget that
  cannot hold the whole tail keeps its most recent entries. Same for the short-prompt recency scores.
* Sinks are the entries at the first ``n_sink`` *original* positions (kvpress: the first ``n_sink``
  entries present), so a propagation cut cannot make a later token a sink; the partitions start right
  after the sinks that reached the layer.
* A channel constant over the reference partition (maximum = minimum) divides by zero in kvpress
  (NaN scores, which ``topk`` ranks first); here the span is taken as 1 there.
* float32 arithmetic whatever the model's dtype (kvpress: the keys' dtype).

A *fractional* budget never resolves below ``n_sink + 8`` entries (capped at the prompt); a token
budget is kept exactly and must exceed ``n_sink``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.policies.presets import CachePreset
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: Entries chosen by score that a fractional budget leaves besides the sinks (SnapKV's default window).
MIN_SCORED = 8


def lag_relative_scores(states: torch.Tensor) -> torch.Tensor:
    """kvpress's ``_get_states_score``: each partition's tokens scored against the next partition.

    Args:
        states: ``(B, H, P, lag, d)`` keys or values cut into ``P >= 2`` partitions of ``lag`` tokens.

    Returns:
        ``(B, H, P - 1, lag)`` float32: per partition ``p < P - 1``, the softmax over its tokens of the
        standard deviation (over channels, unbiased) of each token min-max normalised per channel by
        partition ``p + 1``'s minimum and maximum.
    """
    states = states.float()
    ref, target = states[:, :, 1:], states[:, :, :-1]
    low = ref.amin(dim=-2, keepdim=True)
    span = ref.amax(dim=-2, keepdim=True) - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return ((target - low) / span).std(dim=-1).softmax(dim=-1)


def lagkv_scores(
    key: torch.Tensor, value: torch.Tensor, n_sink: int, lag_size: int, cross_scoring: bool = False
) -> torch.Tensor:
    """LagKV importance of every entry present (higher: keep).

    Args:
        key: ``(B, H_kv, T, d)``.
        value: ``(B, H_kv, T, d_v)``.
        n_sink: how many leading entries are sinks (scored ``+inf``).
        lag_size: partition length.
        cross_scoring: keep the softmax scores (comparable across partitions) instead of each
            partition's ranks ``rank / lag_size``.

    Returns:
        ``(B, H_kv, T)`` float32: ``+inf`` on the sinks; when ``T < n_sink + 2 * lag_size`` the rest
        ranked by recency (``i / (T - n_sink)``, in ``[0, 1)``); otherwise partition scores in
        ``[0, 1]`` for the first ``P - 1`` partitions and ``1 + (i + 1) / tail_len`` on the tail.
    """
    b, h, t, d = key.shape
    n_sink = min(n_sink, t)
    out = torch.empty(b, h, t, dtype=torch.float32, device=key.device)
    out[..., :n_sink] = math.inf
    rest = t - n_sink
    if t < n_sink + 2 * lag_size:
        out[..., n_sink:] = torch.arange(rest, device=key.device, dtype=torch.float32) / max(rest, 1)
        return out
    end = n_sink + (rest // lag_size) * lag_size
    tail = lag_size + t - end
    parts = (end - n_sink) // lag_size
    k = key[:, :, n_sink:end].reshape(b, h, parts, lag_size, d)
    v = value[:, :, n_sink:end].reshape(b, h, parts, lag_size, value.shape[-1])
    score = (lag_relative_scores(k) + lag_relative_scores(v)) / 2  # (B, H, P - 1, lag)
    if not cross_scoring:
        score = score.argsort(dim=-1).argsort(dim=-1).float() / lag_size
    out[..., n_sink : t - tail] = score.reshape(b, h, -1)
    out[..., t - tail :] = 1 + torch.arange(1, tail + 1, device=key.device, dtype=torch.float32) / tail
    return out


class LagKVSettings(Settings):
    """The scoring settings :class:`LagKV` and its preset share; see :class:`LagKV`."""

    n_sink: int = Field(4, ge=0)
    lag_size: int = Field(128, ge=1)
    cross_scoring: bool = False


class LagKV(LagKVSettings, SelectsTopScores, CachePolicy):
    """Keep each layer's entries that stand out most from the partition after them, per KV head.

    Attributes:
        budget: entries kept per layer and KV head, sinks included: tokens (int, kept exactly, more
            than ``n_sink``) or a fraction of the prompt (float, ``int(L * r)`` but at least
            ``n_sink + 8``, at most ``L``). kvpress's ``compression_ratio`` is ``1 - budget``.
        n_sink: first prompt positions always kept (kvpress: 4).
        lag_size: partition length, each scored against the next (kvpress: 128).
        cross_scoring: compare softmax scores across partitions instead of ranking within each
            (kvpress: ``False``; "useful with AdaKVPress").
    """

    kind = "lagkv"

    budget: Budget = 0.1

    @model_validator(mode="after")
    def _check(self) -> LagKV:
        if isinstance(self.budget, int) and self.budget <= self.n_sink:
            raise ValueError(
                f"budget ({self.budget}) must exceed n_sink ({self.n_sink}) to leave room for scored entries"
            )
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at
        ``n_sink + 8``)."""
        return resolve_budget(self.budget, prompt_len, floor=self.n_sink + MIN_SCORED)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 :func:`lagkv_scores`, ``+inf`` on the sinks present (by original
        position); the :class:`~kvpolicy.interfaces.ScoresKeys` contract."""
        sinks = (view.positions < self.n_sink).sum(dim=-1).tolist()  # prefill: one sync per layer
        rows = []
        for b, n in enumerate(sinks):
            key, value = view.key[b : b + 1], view.value[b : b + 1]
            rows.append(lagkv_scores(key, value, n, self.lag_size, self.cross_scoring))
        return torch.cat(rows)


class LagKVPreset(LagKVSettings, CachePreset):
    """LagKV: query-agnostic cache compression at every layer, full prefill.

    Fields mirror :class:`LagKV` (``kv_budget`` is its ``budget``).
    """

    kind = "lagkv"
    description = "LagKV: entries scored against the next lag partition (Liang et al. 2025)"

    policy_class = LagKV
    settings_class = LagKVSettings

    kv_budget: Budget = 0.1


__all__ = ["LagKV", "LagKVPreset", "lag_relative_scores", "lagkv_scores"]
