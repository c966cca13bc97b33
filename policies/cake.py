"""CAKE cache (Qin et al. 2025, "CAKE: Cascading and Adaptive KV Cache Eviction with Layer
Preferences", ICLR 2025, arXiv 2503.12491): per-layer budgets from attention dispersion.

Each layer's attention is measured on the last ``window`` queries (the observation window, causal
inside it) over the keys before the window:

* spatial dispersion ``H_l``: the entropy ``-Σ p log(p + 1e-10)`` of those attention weights,
  summed over query heads, window queries and keys;
* temporal shift ``V_l``: the variance of each key's weight across the window queries (unbiased),
  summed over query heads and keys;
* the layer's preference ``P_l = H_l^(1/tau1) · V_l^(1/tau2)``.

The layers share a total of ``N · (C - w)`` selected entries (``C`` the average budget per layer,
window included; ``w`` the window, always kept besides), split in proportion to ``P_l``. Inside a
layer each KV head keeps its top entries by the eviction indicator ``mean_w(A) + gamma · var_w(A)``
over the window queries (a key whose importance shifts is kept too), average-pooled along the keys
(kernel 5) and averaged over the query heads of the KV group, plus the window.

Defaults are the official code's (github.com/antgroup/cakekv, read from its public mirrors;
``cake/model/modify_llama.py`` ``llama_attn_forward_cake``, ``cake/cake_cache.py``
``CakeprefillKVCache``, ``cake/utils.py`` ``calculate_entropy`` / ``adjust_budgets``,
``experiments/LongBench/pred_cake.py``): window 32, ``tau1 = tau2 = 1.0`` (the script's fallback;
``config/model2tau.json`` tunes them per model and cache size, e.g. 1.6 / 0.4 for Llama-3.1-8B at
1024), ``gamma`` 200, pooling kernel 5 (average, zero padding counted), entropy epsilon 1e-10. Its
``cache_size`` (1024 tokens, window included) is ``budget`` here, default 0.1 of the prompt as the
other FastKV baselines.

**Allocation: what is simplified.** The reference splits the total by ``P_l / Σ_j P_j`` over *all*
layers (truncated to ints, capped at the prompt, the rounding left-over spread by
``adjust_budgets``): by default once the last layer is prefilled, every layer's cache then cut to its
budget; with ``--cascading`` after every layer ``l``, among layers ``0..l``, shrinking the earlier
layers' caches as later layers arrive (to bound peak memory). Both end at the same split, and both
need every layer's preference before the first layer's cache is final. kvpolicy asks
:meth:`CAKE.select` once per layer and stores what it returns at once (an earlier layer's cache
cannot be shrunk later in the prefill, and the cache is not reachable from ``select``), so this
decides layer ``l``'s budget when layer ``l`` is seen, from the preferences of layers ``0..l``
(:func:`cake_layer_budget`): of the budget not yet given out, layer ``l`` takes the share its
preference would get if the layers still to come had the mean preference seen so far, and the
last layer takes what is left. The budgets then sum to exactly the total (``N · C`` entries with
the windows), no layer gets more than the prompt, and when all layers have the same preference
each gets ``C`` (as in the reference). Where later layers turn out to prefer more than the running
mean, the earlier layers got more than the reference would give them (and the last layers absorb
the difference), less where later layers prefer less.

Other differences from the reference:

* a prompt of at most ``C`` tokens is kept whole (the kvpolicy convention); the reference skips
  compression up to ``cache_size + window`` tokens;
* probabilities stay in float32 (the reference rounds them to the model's dtype before scoring);
* the reference also evicts while decoding (each new token's pooled attention re-selects a layer's
  entries outside the last window); here ``select`` runs at prefill only and the cache grows by one
  entry per generated token, as with SnapKV;
* each sequence of a batch gets its own preferences and budgets (the reference sums entropies over
  the batch); a layer that a propagation policy leaves fewer tokens than its budget keeps them all
  (budgets are allocated against the prompt length).

A *fractional* ``C`` never resolves below ``2 w`` (capped at the prompt), as SnapKV's; a token ``C``
is used exactly and must hold the window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.snapkv import budget_floor, check_window_fits
from kvpolicy.presets import Preset
from kvpolicy.scoring import keep_top_and_window, pool_scores
from kvpolicy.state import RequestState

#: Added inside the logarithm of the entropy, as the reference's ``calculate_entropy``.
ENTROPY_EPS = 1e-10


def window_attention_rows(
    query: torch.Tensor, key: torch.Tensor, window: int, scaling: float
) -> torch.Tensor:
    """Softmax attention of each of the last ``window`` queries over all keys (not summed).

    Causal inside the window block (prefix keys all precede the window); scores and softmax in
    float32; keys are never repeated to query heads (the queries take the grouped layout).

    Args:
        query: ``(B, H_q, T, d)`` after RoPE.
        key: ``(B, H_kv, T, d)`` after RoPE; ``H_q`` a multiple of ``H_kv``.
        window: trailing queries, ``1 <= window <= T``.
        scaling: softmax scale.

    Returns:
        ``(B, H_kv, n_rep, window, T)`` float32, ``n_rep = H_q / H_kv``.
    """
    b, h_q, t, d = query.shape
    h_kv = key.shape[1]
    n_rep = h_q // h_kv
    q = query[:, :, t - window :, :].to(key.dtype).reshape(b, h_kv, n_rep * window, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling
    scores = scores.view(b, h_kv, n_rep, window, t)
    q_idx = torch.arange(t - window, t, device=key.device).view(window, 1)
    k_idx = torch.arange(t, device=key.device).view(1, t)
    return scores.masked_fill(k_idx > q_idx, float("-inf")).softmax(dim=-1)


def _window_variance(attn: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the window queries (dim 3); zero for a one-query window (the reference's
    ``torch.var`` would be NaN there: no temporal shift can be measured from one query)."""
    if attn.shape[3] < 2:
        return torch.zeros_like(attn[:, :, :, 0])
    return attn.var(dim=3)


def cake_preference(attn: torch.Tensor, window: int, tau1: float, tau2: float) -> torch.Tensor:
    """Each sequence's layer preference ``H^(1/tau1) · V^(1/tau2)`` from its window attention.

    Args:
        attn: ``(B, H_kv, n_rep, w, T)`` from :func:`window_attention_rows`.
        window: ``w``; the last ``w`` keys (the window's own) are left out, as in the reference.
        tau1: temperature of the spatial dispersion (entropy).
        tau2: temperature of the temporal shift (variance).

    Returns:
        ``(B,)`` float64 preference scores (0 when the window sees no earlier key).
    """
    prefix = attn[..., : attn.shape[-1] - window]  # (B, H_kv, n_rep, w, P)
    entropy = -(prefix * torch.log(prefix + ENTROPY_EPS)).sum(dim=(1, 2, 3, 4))
    shift = _window_variance(prefix).sum(dim=(1, 2, 3))
    return entropy.double().clamp_min(0.0) ** (1.0 / tau1) * shift.double() ** (1.0 / tau2)


def cake_scores(attn: torch.Tensor, window: int, gamma: float, kernel: int) -> torch.Tensor:
    """CAKE's eviction indicator per KV head for the keys before the window.

    ``mean + gamma · var`` of each key's weight over the window queries (unbiased variance), the
    window keys dropped, average-pooled along the keys (``kernel``, stride 1, zero padding counted),
    then averaged over the ``n_rep`` query heads of each KV group, in the reference's order.

    Args:
        attn: ``(B, H_kv, n_rep, w, T)`` from :func:`window_attention_rows`.
        window: ``w``.
        gamma: weight of the variance.
        kernel: pooling kernel (odd).

    Returns:
        ``(B, H_kv, T - w)`` float32.
    """
    score = attn.mean(dim=3) + gamma * _window_variance(attn)  # (B, H_kv, n_rep, T)
    prefix = score[..., : score.shape[-1] - window]
    return pool_scores(prefix, kernel, "avg").mean(dim=2)


def cake_layer_budget(preferences: Sequence[float], spent: int, total: int, num_layers: int, cap: int) -> int:
    """Selected entries (window excluded) for the layer whose preference is ``preferences[-1]``.

    Layer ``l = len(preferences) - 1`` of ``num_layers`` takes, of the ``total - spent`` entries not
    yet given out, the share its preference gets against the layers still to come, each estimated
    at the mean preference of layers ``0..l``: ``R · P_l / (P_l + (N - l - 1) · mean(P_0..P_l))``,
    rounded down (the reference truncates too). The last layer takes all that is left. The result
    is clamped so that no layer exceeds ``cap`` and the later layers can still hold the rest
    (``R - b <= (N - l - 1) · cap``): summed over the layers the budgets are exactly ``total`` when
    ``total <= N · cap``. A zero denominator (no layer disperses) splits evenly.

    Args:
        preferences: preference scores of layers ``0..l``.
        spent: entries given to layers ``0..l-1``.
        total: entries to give out over all layers, ``N · (C - w)``.
        num_layers: ``N``.
        cap: most entries one layer can use (its prompt tokens outside the window).
    """
    remaining = total - spent
    left = num_layers - (len(preferences) - 1)  # layers still to allocate, this one included
    if left <= 1:
        share = remaining
    else:
        mine = float(preferences[-1])
        mean = sum(float(p) for p in preferences) / len(preferences)
        denom = mine + (left - 1) * mean
        share = int(remaining * mine / denom) if denom > 0 else remaining // left
    low = max(0, remaining - (left - 1) * cap)
    high = max(0, min(cap, remaining))
    return min(max(share, low), high)


class CAKE(CachePolicy):
    """Per-layer budgets from attention dispersion, mean + variance eviction indicator per KV head.

    Attributes:
        budget: average entries kept per layer and KV head, window included: tokens (int, used
            exactly) or a fraction of the prompt (float, ``int(L * r)`` but at least ``2 * window``,
            at most ``L``). The layers' entries sum to ``num_layers`` times this.
        window: observation window (the last queries scored; their keys are always kept).
        kernel: average-pooling kernel along the key axis (odd).
        tau1: temperature of the spatial dispersion in the layer preference.
        tau2: temperature of the temporal shift in the layer preference.
        gamma: weight of the attention variance in the eviction indicator.
    """

    kind = "cake"

    budget: Budget = 0.1
    window: int = Field(32, ge=2)
    kernel: OddKernel = 5
    tau1: float = Field(1.0, gt=0.0)
    tau2: float = Field(1.0, gt=0.0)
    gamma: float = Field(200.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> CAKE:
        check_window_fits(self.budget, self.window)
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """The average entries per layer ``C`` for a prompt of ``prompt_len`` tokens (window included)."""
        return resolve_budget(self.budget, prompt_len, floor=budget_floor(self.window))

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        """Score this layer, take its budget from the preferences seen so far, keep its top entries.

        Per-request running state (the preferences of the layers before, the entries given out) lives
        in ``state.scratch(self)``; layer 0 starts it afresh (a restarted pass starts at layer 0 too).
        """
        average = self.resolved_budget(view.prompt_len)
        run = state.scratch(self)
        if view.layer == 0 or "preferences" not in run:
            run["preferences"], run["spent"] = [], 0
        if view.prompt_len <= average:
            return None  # nothing to drop anywhere: no scoring
        window = min(self.window, view.num_tokens)
        attn = window_attention_rows(view.query, view.key, window, view.scaling)
        # One host read per layer at prefill: the budget is a count the selection's shape needs.
        run["preferences"].append(float(cake_preference(attn, window, self.tau1, self.tau2)[0]))
        total = view.num_layers * (average - self.window)
        prefix = cake_layer_budget(
            run["preferences"], run["spent"], total, view.num_layers, view.prompt_len - self.window
        )
        run["spent"] += prefix
        keep = prefix + window
        if view.num_tokens <= keep:
            return None
        return keep_top_and_window(cake_scores(attn, window, self.gamma, self.kernel), keep, window)


class CAKEPreset(Preset):
    """CAKE: layer budgets from attention dispersion, mean + variance eviction, full prefill."""

    kind = "cake"
    description = "CAKE: preference-based per-layer budgets, mean+variance eviction (Qin et al. 2025)"

    kv_budget: Budget = 0.1
    window: int = Field(32, ge=2)
    kernel: int = Field(5, ge=1)
    tau1: float = Field(1.0, gt=0.0)
    tau2: float = Field(1.0, gt=0.0)
    gamma: float = Field(200.0, ge=0.0)

    def build(self) -> Policy:
        cache = CAKE(
            budget=self.kv_budget,
            window=self.window,
            kernel=self.kernel,
            tau1=self.tau1,
            tau2=self.tau2,
            gamma=self.gamma,
        )
        return Policy(AllTokens(), cache)
