"""DuoAttention (Xiao et al. 2024, arXiv 2410.10819): retrieval heads keep everything, streaming heads
keep attention sinks plus a recent window.

Only a fraction of attention heads retrieve information from far back in the context ("retrieval
heads"); the others attend to the first tokens and the recent ones ("streaming heads"), so their
cache can be StreamingLLM's without loss. DuoAttention learns one gate value per (layer, KV head) by
optimisation on synthetic passkey data and keeps a head's full cache when its value is at or above a
threshold. Here a *head map* gives those values (per layer, per KV head, a score in ``[0, 1]``) and
:meth:`DuoAttention.select` returns a ragged :class:`~kvpolicy.interfaces.PerHead` selection: retrieval
heads keep every entry, streaming heads the sinks and the most recent entries (by original position,
as :class:`~kvpolicy.policies.streamingllm.StreamingLLM` selects). The paged cache stores exactly each
head's count, so a streaming head really frees its memory.

Defaults and where they come from:

* ``sink = 64``, ``recent = 256``, ``threshold = 0.5``: the official code's defaults
  (github.com/mit-han-lab/duo-attention, ``duo_attn/utils.py``, ``parse_args``: ``--sink_size 64``,
  ``--recent_size 256``, ``--threshold 0.5``; a head is a retrieval head when
  ``full_attention_heads >= threshold``, ``sparsify_attention_heads``; its static decoding cache,
  ``duo_attn/patch/static_kv_cache.py``, splits at ``> 0.5``). The head patterns it ships
  were trained with other sizes, recorded in each pattern's ``config.json`` (e.g.
  ``attn_patterns/Meta-Llama-3.1-8B-Instruct/.../config.json``: sink 128, recent 256); kvpress's
  ``DuoAttentionPress`` (github.com/NVIDIA/kvpress, ``kvpress/presses/duo_attention_press.py``) reads
  sink and recent from that file and uses 128 / 256 for its on-the-fly scores. Set ``sink`` and
  ``recent`` to the values the head map was made with.
* The head map is the official ``full_attention_heads.tsv`` layout (rows: layers, columns: KV heads):
  ``head_map_file`` reads that TSV (values clipped to ``[0, 1]`` as the official ``load_attn_pattern``
  does) or JSON (a list of lists, or an object with a ``"head_map"`` list, as
  :func:`write_head_map` writes). kvpress instead marks the lowest-scoring
  ``head_compression_ratio`` share of heads as streaming: ``ratio`` does the same, with the call
  kvpress makes (``np.argsort(head_scores, axis=None)[:n]`` on the float64 map, numpy's default
  sort, which is not stable), so heads tied at the cut are split as kvpress splits them (see
  :func:`streaming_for_ratio`); :func:`threshold_for_ratio` gives a threshold for at least that
  share (a threshold cannot split tied heads).
* Compression is at prefill only by default, as kvpress does (its press masks the streaming heads'
  middle entries at prefill); ``rolling=True`` also keeps each streaming head at ``sink + recent``
  while decoding, as the official static cache does (``duo_attn/patch/static_kv_cache.py``).

The gate training needs the passkey data set and GPUs, and the trained patterns cover a few 7-8B
models only. :func:`duo_head_scores` is a measured proxy for any model: for each (layer, KV head), the
share of the last queries' attention that falls outside the sinks and the recent window on
calibration prompts (heads that look far are retrieval heads), normalised so the farthest-looking
head scores 1. It ranks heads by what the paper's gates select for, but it is not the paper's
optimisation (which asks whether dropping a head's middle changes the model's outputs). From the
command line, ``kvpolicy calibrate --duo-heads --out DIR`` (with the usual prompt options, and
``--duo-sink`` / ``--duo-recent``) writes ``DIR/duo_head_map.json`` and ``DIR/duo_policy.json``
(:func:`calibrate_heads`). ``tests/data/duo_smollm2_head_map.json`` is such a map for the embedded
SmolLM2-135M-Instruct (3 needle prompts of 1500 tokens, sink 64, recent 256): 22 of its 90 KV heads
score 0.5 or more, all in layers 0-9. Measured with it (threshold 0.5, 41 % of full KV on average):
needle-in-a-haystack at 1.5K tokens was lost at depths 0.1 and 0.5, as StreamingLLM with the same
320 entries per head lost it, while full KV found it; attention *mass* beyond the window is a weak
proxy for retrieval on this model (a head that retrieves a needle puts little mass on it). Use the
official trained patterns where they exist, or validate a proxy map on your task before trusting it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PrivateAttr, model_validator

from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView, PerHead, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.streamingllm import sink_recent_keep
from kvpolicy.presets import Preset
from kvpolicy.state import Batch, RequestState

#: The official defaults (duo_attn/utils.py): sink tokens, recent tokens, retrieval threshold.
DEFAULT_SINK = 64
DEFAULT_RECENT = 256
DEFAULT_THRESHOLD = 0.5


def _check_map(head_map: Any, what: str) -> list[list[float]]:
    """``head_map`` as a list of per-layer lists of floats in ``[0, 1]``, or ``ValueError`` naming it."""
    if not isinstance(head_map, (list, tuple)) or not head_map:
        raise ValueError(f"{what} must be a non-empty list (layers) of lists (KV heads), got {head_map!r}")
    out = []
    for layer, row in enumerate(head_map):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"{what}[{layer}] must be a non-empty list of KV-head scores, got {row!r}")
        values = []
        for head, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{what}[{layer}][{head}]={value!r} is not a number")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{what}[{layer}][{head}]={value!r} is outside [0, 1]")
            values.append(float(value))
        out.append(values)
    return out


def read_head_map(path: Path | str) -> list[list[float]]:
    """A head map from ``path``: the official ``full_attention_heads.tsv`` (clipped to ``[0, 1]``, as
    the official loader does) or JSON (a list of lists, or ``{"head_map": [...], ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"head_map_file={str(path)!r} does not exist (or is not a file)")
    text = path.read_text()
    what = f"head_map_file={str(path)!r}"
    if path.suffix.lower() in (".tsv", ".txt"):
        try:
            rows = [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise ValueError(f"{what} is not a tab-separated table of numbers: {exc}") from None
        return _check_map([[min(1.0, max(0.0, v)) for v in row] for row in rows], what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        if "head_map" not in data:
            raise ValueError(f"{what} holds a JSON object without a 'head_map' list")
        data = data["head_map"]
    return _check_map(data, what)


def write_head_map(path: Path | str, head_map: Sequence[Sequence[float]], **meta: Any) -> Path:
    """Write ``head_map`` as JSON (``{"head_map": [...], **meta}``) for ``head_map_file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = _check_map([list(r) for r in head_map], "head_map")
    path.write_text(json.dumps({"head_map": rows, **meta}, indent=1))
    return path


def threshold_for_ratio(head_map: Sequence[Sequence[float]], ratio: float) -> float:
    """A threshold that makes at least ``ratio`` of the heads streaming heads (kvpress's
    ``head_compression_ratio``: the ``round(ratio * n)`` lowest-scoring heads). A threshold cannot
    split heads of equal score: heads tied with the last one the ratio takes stream too, so a tie at
    the cut makes *more* heads stream, never fewer. For exactly the ratio, tied heads split as
    kvpress splits them, give :class:`DuoAttention` ``ratio`` instead (:func:`streaming_for_ratio`)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1]")
    scores = sorted(v for row in head_map for v in row)
    n = round(ratio * len(scores))
    if n == 0:
        return 0.0
    above = [v for v in scores[n:] if v > scores[n - 1]]
    return above[0] if above else float("inf")


def streaming_for_ratio(head_map: Sequence[Sequence[float]], ratio: float) -> list[list[bool]]:
    """Per layer and KV head: whether it streams when exactly ``round(ratio * n)`` of the ``n`` heads
    do, the lowest-scoring ones, chosen by the call kvpress's ``DuoAttentionPress.post_init_from_model``
    makes: ``np.argsort(head_scores, axis=None)[:n]`` on the ``(layers, kv_heads)`` map as float64
    (the dtype of the TSV it loads), flattened layer by layer.

    That is numpy's default sort, ``kind="quicksort"`` (an introsort, or a SIMD sort on CPUs that
    have one): it is *not* stable, so heads tied at the cut are split in an order that is neither
    layer-first nor any other simple rule. On SmolLM2's shipped map at ratio 0.5, the heads
    ``(14, 1)`` and ``(29, 0)`` both score 0.1343 at the cut and numpy streams ``(29, 0)``. Making
    the same call gives kvpress's heads whenever both run the same numpy on the same kind of CPU;
    numpy's order among ties can change with its version and with the CPU features its sort
    dispatches to (measured with numpy 2.4: a map of values rounded to one decimal orders its ties
    differently with AVX2 disabled, ``NPY_DISABLE_CPU_FEATURES``), so across machines kvpress's own
    choice among tied heads is not fixed either. Heads that are not tied at the cut never depend on it.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1]")
    # argsort(axis=None) sorts the C-order flattening, so the flat layer-major array is the same call
    # (and a map with different head counts per layer still works).
    flat = np.asarray([v for row in head_map for v in row], dtype=np.float64)
    n = round(ratio * flat.size)
    chosen = set(np.argsort(flat)[:n].tolist()) if n > 0 else set()
    starts = np.cumsum([0] + [len(row) for row in head_map]).tolist()
    return [
        [starts[layer] + head in chosen for head in range(len(row))] for layer, row in enumerate(head_map)
    ]


class DuoAttention(CachePolicy):
    """Retrieval heads (score ``>= threshold``) keep their whole cache; streaming heads keep the first
    ``sink`` positions and the ``recent`` most recent entries.

    Attributes:
        head_map: per layer, per KV head, a score in ``[0, 1]`` (the official
            ``full_attention_heads``); exactly one of ``head_map`` and ``head_map_file``.
        head_map_file: a JSON or TSV file holding the head map (see :func:`read_head_map`); read and
            checked when the policy is built.
        threshold: a head whose score is at or above it keeps everything (official default 0.5).
        ratio: instead of ``threshold``, the share of heads that stream, met exactly: the
            ``round(ratio * heads)`` lowest-scoring heads, chosen with kvpress's own call (numpy's
            default, unstable ``argsort``), so ties at the cut split as kvpress splits them
            (kvpress's ``head_compression_ratio``; see :func:`streaming_for_ratio`).
        sink: initial prompt positions a streaming head keeps (official default 64).
        recent: most recent entries a streaming head keeps besides its sinks (official default 256).
        rolling: streaming heads keep evicting while decoding (their oldest non-sink entry once they
            hold more than ``sink + recent``), as the official static cache keeps them at that size;
            ``False`` (kvpress's behaviour) compresses at prefill only.
    """

    kind = "duoattention"

    head_map: list[list[float]] | None = None
    head_map_file: Path | None = None
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    ratio: float | None = Field(None, ge=0.0, le=1.0)
    sink: int = Field(DEFAULT_SINK, ge=0)
    recent: int = Field(DEFAULT_RECENT, ge=1)
    rolling: bool = False

    _scores: list[list[float]] = PrivateAttr(default_factory=list)
    _retrieval: list[list[bool]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DuoAttention:
        if (self.head_map is None) == (self.head_map_file is None):
            given = "both" if self.head_map is not None else "neither"
            raise ValueError(
                f"give exactly one of head_map and head_map_file (got {given}: head_map="
                f"{'...' if self.head_map is not None else None}, head_map_file={self._file_repr()})"
            )
        if self.head_map is not None:
            self._scores = _check_map(self.head_map, "head_map")
        else:
            self._scores = read_head_map(self.head_map_file)  # type: ignore[arg-type]
        if self.ratio is not None:
            streaming = streaming_for_ratio(self._scores, self.ratio)
            self._retrieval = [[not s for s in row] for row in streaming]
        else:
            self._retrieval = [[v >= self.threshold for v in row] for row in self._scores]
        return self

    def _file_repr(self) -> str:
        return repr(str(self.head_map_file)) if self.head_map_file is not None else "None"

    @property
    def scores(self) -> list[list[float]]:
        """The head map (from ``head_map`` or read from ``head_map_file``)."""
        return self._scores

    def retrieval_heads(self, layer: int) -> list[bool]:
        """Per KV head of ``layer``: whether it is a retrieval head (keeps everything)."""
        return list(self._retrieval[layer])

    @property
    def streaming_keep(self) -> int:
        """Entries a streaming head keeps: ``sink + recent``."""
        return self.sink + self.recent

    def check_model(self, num_layers: int) -> None:
        if len(self._scores) != num_layers:
            raise ValueError(
                f"head map has {len(self._scores)} layers, the model has {num_layers} "
                f"(duoattention {self._source()}); a head map is made for one model"
            )

    def _source(self) -> str:
        return f"head_map_file={self._file_repr()}" if self.head_map_file else "head_map"

    def select(self, view: LayerView, state: RequestState) -> PerHead | torch.Tensor | None:
        if view.layer >= len(self._scores):  # check_model normally refuses this first
            self.check_model(view.num_layers)
        row = self._scores[view.layer]
        if len(row) != view.num_kv_heads:
            raise ValueError(
                f"head map layer {view.layer} has {len(row)} KV heads, the model has {view.num_kv_heads} "
                f"(duoattention {self._source()}); a head map is made for one model"
            )
        t = view.num_tokens
        keep = self.streaming_keep
        retrieval = self.retrieval_heads(view.layer)
        if t <= keep or all(retrieval):
            return None
        b, h = view.key.shape[0], view.num_kv_heads
        streaming = sink_recent_keep(view.positions, keep, self.sink)  # (B, keep), ascending
        if not any(retrieval):  # every head streaming: StreamingLLM's selection, one width
            return streaming[:, None, :].expand(b, h, keep)
        device = view.key.device
        ar = torch.arange(t, device=device)
        kept = torch.zeros(b, t, dtype=torch.bool, device=device).scatter(1, streaming, True)
        is_retrieval = torch.tensor(retrieval, device=device)[None, :, None]  # (1, H, 1)
        kept = kept[:, None, :] | is_retrieval  # (B, H, T)
        counts = kept.sum(dim=-1)
        # Kept entries first, in position order; the dropped ones after (ignored by the cache).
        indices = torch.where(kept, ar, ar + t).sort(dim=-1).values % t
        return PerHead(indices, counts)

    @property
    def evicts_during_decode(self) -> bool:
        return self.rolling

    decodes_batched = True

    def on_decode(self, view: DecodeView, state: RequestState | Batch) -> Evict | None:
        """Rolling: a streaming head holding more than ``sink + recent`` entries evicts its oldest
        non-sink entry in place; retrieval heads keep everything. Tensor ops only (the per-layer head
        mask is made once per batch and kept in its scratch)."""
        if not self.rolling:
            return None
        store = state.scratch(self)
        key = ("streaming", view.layer)
        if key not in store:
            streaming = [not r for r in self.retrieval_heads(view.layer)]
            store[key] = torch.tensor(streaming, device=view.lengths.device)[None, :]  # (1, H_kv)
        pos = view.positions
        never = torch.iinfo(pos.dtype).max
        priority = pos.masked_fill((pos < self.sink) | ~view.valid, never)  # sinks and empty slots stay
        oldest = priority.argmin(dim=-1)  # (B, H_kv)
        evict = store[key] & (view.lengths > self.streaming_keep)
        return Evict(torch.where(evict, oldest, -1)[..., None])


class DuoAttentionPreset(Preset):
    """DuoAttention: full cache on retrieval heads, sinks + recent on streaming heads, full prefill."""

    kind = "duoattention"
    description = "DuoAttention: retrieval heads keep all, streaming heads sinks + recent (Xiao et al. 2024)"

    head_map_file: Path
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    ratio: float | None = Field(None, ge=0.0, le=1.0)
    sink: int = Field(DEFAULT_SINK, ge=0)
    recent: int = Field(DEFAULT_RECENT, ge=1)
    rolling: bool = False

    def build(self) -> Policy:
        cache = DuoAttention(
            head_map_file=self.head_map_file,
            threshold=self.threshold,
            ratio=self.ratio,
            sink=self.sink,
            recent=self.recent,
            rolling=self.rolling,
        )
        return Policy(AllTokens(), cache)


# -- calibration: a measured proxy for the trained gates ------------------------------------------
class _FarAttentionProbe(CachePolicy):
    """Keeps everything; records per layer and KV head the share of the last ``window`` queries'
    attention on entries that are neither sinks (position ``< sink``) nor recent (among the last
    ``recent`` positions of the prompt). A measuring instrument, not registered."""

    kind = "duo-far-attention-probe"
    sink: int = Field(DEFAULT_SINK, ge=0)
    recent: int = Field(DEFAULT_RECENT, ge=1)
    window: int = Field(32, ge=1)

    def select(self, view: LayerView, state: RequestState) -> None:
        window = min(self.window, view.num_tokens)
        attn = view.window_attention(window)  # (B, H_kv, n_rep, T), summed over the window queries
        pos = view.positions  # (B, T)
        far = (pos >= self.sink) & (pos < view.prompt_len - self.recent)
        share = (attn * far[:, None, None, :]).sum(-1) / attn.sum(-1).clamp_min(1e-12)
        state.scratch(self).setdefault("far", {})[view.layer] = share.mean(dim=-1)[0].double().cpu()
        return None


def duo_head_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    sink: int = DEFAULT_SINK,
    recent: int = DEFAULT_RECENT,
    window: int = 32,
    normalize: bool = True,
) -> list[list[float]]:
    """Per layer and KV head, how much the head attends beyond sinks + recent: a head map in ``[0, 1]``.

    For each prompt (text, encoded with ``tokenizer`` as is, or token ids), a full prefill records,
    for every (layer, KV head), the share of the last ``window`` queries' attention (averaged over the
    head's query heads) that falls on positions ``>= sink`` and before the last ``recent``: what a
    streaming head with these sizes would lose. The shares are averaged over the prompts and, with
    ``normalize``, divided by the largest (the farthest-looking head scores 1; all zero stays zero),
    so ``threshold`` reads as "at least this share of the farthest head's reach".

    A proxy for DuoAttention's gate training (an optimisation that distils the full model's outputs
    on passkey-retrieval data): it ranks heads by where they look on *your* prompts, not by how much
    the outputs change without their middle. Prompts must be longer than ``sink + recent``.

    Returns:
        ``[layers][kv_heads]`` floats in ``[0, 1]``; write it with :func:`write_head_map`.
    """
    from kvpolicy import compose
    from kvpolicy.generation import prefill

    if not prompts:
        raise ValueError("duo_head_scores needs at least one calibration prompt")
    probe = _FarAttentionProbe(sink=sink, recent=recent, window=window)
    total: torch.Tensor | None = None
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer was given")
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            ids = torch.as_tensor(prompt).reshape(-1).tolist()
        if len(ids) <= sink + recent:
            raise ValueError(
                f"calibration prompt {i} has {len(ids)} tokens; duo_head_scores needs more than "
                f"sink + recent = {sink} + {recent} = {sink + recent} (nothing lies beyond them otherwise)"
            )
        pre = prefill(model, torch.tensor([ids]), compose(cache=probe))
        recorded = pre.state.scratch(probe)["far"]
        shares = torch.stack([recorded[layer] for layer in range(len(recorded))])  # (layers, H_kv)
        total = shares if total is None else total + shares
    assert total is not None
    mean = total / len(prompts)
    if normalize and float(mean.max()) > 0:
        mean = mean / mean.max()
    return mean.clamp(0.0, 1.0).tolist()


def calibrate_heads(
    model: Any,
    tokenizer: Any,
    out: Path,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    sink: int = DEFAULT_SINK,
    recent: int = DEFAULT_RECENT,
    window: int = 32,
    command: str | None = None,
) -> Path:
    """:func:`duo_head_scores` on ``prompts``, written to ``out/duo_head_map.json`` (with the sizes
    and the command), plus ``out/duo_policy.json``, a policy config that uses it. Returns the map's path.
    """
    out = Path(out)
    scores = duo_head_scores(model, tokenizer, prompts, sink=sink, recent=recent, window=window)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    path = write_head_map(
        out / "duo_head_map.json",
        scores,
        model=name,
        method="kvpolicy.policies.duoattention.duo_head_scores (far-attention proxy, not gate training)",
        prompts=len(prompts),
        sink=sink,
        recent=recent,
        window=window,
        command=command,
    )
    config = {"policy": "duoattention", "head_map_file": str(path.absolute()), "sink": sink, "recent": recent}
    (out / "duo_policy.json").write_text(json.dumps(config, indent=2))
    return path


__all__ = [
    "DuoAttention",
    "DuoAttentionPreset",
    "calibrate_heads",
    "duo_head_scores",
    "read_head_map",
    "streaming_for_ratio",
    "threshold_for_ratio",
    "write_head_map",
]
