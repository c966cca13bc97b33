"""GemFilter (Shi et al. 2024, arXiv 2409.17422): an early layer picks the tokens, the model reruns on them.

Layers ``0..layer`` run on the whole prompt (the filter pass, which builds no cache). At the filter
layer, each token is scored by the last query's raw inner product with its key (after RoPE, no
scaling, no softmax) summed over all query heads, average-pooled along the tokens (kernel 5); the
top ``int(L · r)`` tokens, in prompt order, are then run through the *whole* model again with fresh
contiguous positions ``0..k-1`` (a :class:`~kvpolicy.interfaces.Restart`). The composition's cache
policy applies to that second pass: full by default, as in the reference.

Defaults are the FastKV reference code's (github.com/dongwonjo/FastKV,
``baseline/gemfilter``): kernel 5, retention 0.1. Its filter layer is 13 of 32 for
Llama-3.1-8B, 17 of 36 for Ministral-8B and 19 of 40 for Mistral-Nemo; without a ``layer`` this uses
exactly that table for those depths, and for other depths a piecewise-linear rule through its three
points (:func:`default_filter_layer`): linear between 32 and 40 layers, the nearest end's depth
fraction outside (13/32 below 32 layers, 19/40 above 40). That gives 12 of 30 on SmolLM2-135M.
(One scaled fraction cannot fit the table: ``round(13 N / 32)`` says 15 of 36 and 16 of 40.) Like
every depth default it is a starting point: measure before trusting it on another model.

Unlike the reference, the last prompt token always survives the filter: the reference takes a plain
top-k, so a prompt whose last token scores low is answered from the wrong position. Keys are never
repeated to the query heads: the ``n_rep`` queries of each KV group are summed first (the inner
product is linear, so the scores are the same).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from pydantic import Field

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import LayerView, PropagationDecision, PropagationPolicy, Restart
from kvpolicy.scoring import pool_scores
from kvpolicy.state import RequestState


def gemfilter_scores(query: torch.Tensor, key: torch.Tensor, kernel: int) -> torch.Tensor:
    """The last query's raw inner products with every key, summed over query heads, avg-pooled.

    Args:
        query: ``(B, H_q, T, d)`` after RoPE (only the last position is used).
        key: ``(B, H_kv, T, d)`` after RoPE.
        kernel: average-pooling kernel (odd), padding counted as zeros as ``F.avg_pool1d`` does.

    Returns:
        ``(B, T)`` float32.
    """
    b, h_q, _, d = query.shape
    h_kv = key.shape[1]
    q = query[:, :, -1, :].float().reshape(b, h_kv, h_q // h_kv, d).sum(dim=2)  # (B, H_kv, d)
    scores = torch.einsum("bhd,bhtd->bt", q, key.float())
    return pool_scores(scores, kernel, "avg")


def gemfilter_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The top ``keep - 1`` tokens before the last, plus the last one, ascending: ``(B, keep)``."""
    t = scores.shape[-1]
    top = scores[..., : t - 1].topk(keep - 1, dim=-1).indices
    last = torch.full((*scores.shape[:-1], 1), t - 1, dtype=top.dtype, device=top.device)
    return torch.cat([top, last], dim=-1).sort(dim=-1).values


#: The FastKV reference code's filter layers by model depth: Llama-3.1-8B, Ministral-8B, Mistral-Nemo.
REFERENCE_FILTER_LAYERS: dict[int, int] = {32: 13, 36: 17, 40: 19}


def default_filter_layer(num_layers: int) -> int:
    """The filter layer for an ``N``-layer model: the reference's table, interpolated.

    The FastKV reference code filters at 13 of 32 layers, 17 of 36 and 19 of 40, which no single
    depth fraction fits. This reproduces those three points exactly and joins them piecewise
    linearly: between 32 and 40 layers the layer is interpolated linearly between the neighbouring
    points (e.g. 18 of 38); below 32 it is ``13 N / 32`` and above 40 ``19 N / 40`` (the nearest
    point's fraction, continuous at the ends, and never a layer below 0 for a small model as
    extrapolating the 32-36 slope would give). Rounded half up and clamped to ``0..N-2`` (a layer
    must follow the filter). SmolLM2-135M's 30 layers give 12; the tiny 4-layer test model 2.
    """
    points = sorted(REFERENCE_FILTER_LAYERS.items())
    (n_lo, l_lo), (n_hi, l_hi) = points[0], points[-1]
    if num_layers <= n_lo:
        exact = l_lo * num_layers / n_lo
    elif num_layers >= n_hi:
        exact = l_hi * num_layers / n_hi
    else:
        (n0, l0), (n1, l1) = next((a, b) for a, b in pairwise(points) if a[0] <= num_layers <= b[0])
        exact = l0 + (l1 - l0) * (num_layers - n0) / (n1 - n0)
    return min(num_layers - 2, max(0, math.floor(exact + 0.5)))


class GemFilter(PropagationPolicy):
    """Select tokens at an early layer, then rerun the whole model on them with fresh positions.

    Attributes:
        keep: tokens the filter keeps: a count (int) or a fraction of the prompt (float), the
            reference's ``int(L · r)``. The last prompt token is always among them.
        layer: the filter layer (0-based); ``None`` means the reference's table (13 of 32, 17 of
            36, 19 of 40), interpolated for other depths (:func:`default_filter_layer`). Must leave
            at least one layer after it.
        kernel: average-pooling kernel along the tokens (odd).
    """

    kind = "gemfilter"

    keep: Budget = 0.1
    layer: int | None = Field(None, ge=0)
    kernel: OddKernel = 5

    def resolved_layer(self, num_layers: int) -> int:
        return default_filter_layer(num_layers) if self.layer is None else self.layer

    def check_model(self, num_layers: int) -> None:
        if num_layers < 2:
            raise ValueError(f"GemFilter needs a layer after its filter layer; the model has {num_layers}")
        if self.layer is not None and self.layer >= num_layers - 1:
            raise ValueError(
                f"GemFilter layer {self.layer} leaves no layer after it: the model has {num_layers} "
                f"layers, so the filter layer must be in 0..{num_layers - 2}"
            )

    def decision_layers(self, num_layers: int) -> set[int]:
        return {self.resolved_layer(num_layers)}

    def filters(self, prompt_len: int) -> bool:
        """Whether a prompt of this length is filtered (and the model rerun) at all."""
        return resolve_budget(self.keep, prompt_len) < prompt_len

    def needs_cache(self, view: LayerView, state: RequestState) -> bool:
        # The filter pass's cache is discarded by the restart: do not build it.
        return not self.filters(view.prompt_len)

    def propagate(self, view: LayerView, state: RequestState) -> PropagationDecision:
        if view.layer != self.resolved_layer(view.num_layers) or not self.filters(view.prompt_len):
            return None
        scores = gemfilter_scores(view.query, view.key, self.kernel)
        keep = gemfilter_keep(scores, resolve_budget(self.keep, view.prompt_len))
        return Restart(view.positions.gather(1, keep))
