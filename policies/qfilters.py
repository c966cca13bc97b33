"""Q-Filters (Godey et al. 2025, arXiv 2503.02812): keys scored by their projection on one
query direction per KV head, measured once per model; no attention weights, no question.

Queries and keys of a head are anisotropic: the queries lean along one direction ``u_h`` (most of
them project positively on it), so the expected attention logit of a key is, to first order,
proportional to ``⟨k, u_h⟩``. Q-Filters takes ``u_h`` as the principal right singular vector of the
head's queries on calibration text, sign-fixed so that most queries project positively, and keeps
each layer's keys with the largest projection. A cache of projections is all it needs, so it runs
with any attention kernel (the paper's point: FlashAttention-compatible) and is query-agnostic.

What is computed, and where it comes from:

* **The filters** (:func:`filters_from_queries`) follow the official ``make_filters.py``
  (github.com/NathanGodey/qfilters): the queries *after RoPE* (its modified attention stores
  ``query_states`` after ``apply_rotary_pos_emb`` in the cache it reads back), of every token of the
  calibration sequences, a random subsample of ``--num_svd_samples 3000`` tokens (the same tokens for
  every head), the SVD of each query head's ``(samples, d)`` matrix *uncentred* (not a PCA),
  ``sign = +1`` when more than half of the first left singular vector is positive (most queries
  project positively on ``v₀``) else ``-1``, the filter ``f = -sign · v₀``, and the mean of the
  filters of the query heads that share a KV head. The filters kept here are exactly those
  (layers × KV heads × head dim, the official ``q_filters`` tensor and kvpress's ``QFilters``), so
  official filter files load as they are (:func:`read_filters` reads their ``model.safetensors``).
* **The scores** are kvpress's ``QFilterPress.score`` (github.com/NVIDIA/kvpress,
  ``kvpress/presses/qfilter_press.py``): ``-(f · k)`` on the cached keys, which are after RoPE;
  higher is kept. The official ``QFiltersCache`` (``src/hf_cache.py``) keeps the keys of lowest
  ``f · k``: the same ranking.
* **Where the filters come from.** kvpress downloads them from the Hugging Face hub
  (``nthngdy/<model>_qfilt``); kvpolicy never downloads: ``kvpolicy calibrate --qfilters`` measures
  them on the model itself (:func:`calibrate_filters`), on the calibration prompts calibrate already
  uses (needle-in-a-haystack text by default), and writes ``OUT/qfilters_filters.json``. The embedded
  SmolLM2-135M-Instruct ships its own (``kvpolicy/configs/SmolLM2-135M-Instruct/``), which the
  ``qfilters`` preset uses on that model (``packaged_filters``); on any other model, the policy
  without filters stops before prefill with the calibrate command to run.
* ``budget`` default 0.1 (kvpress's ``compression_ratio`` is ``1 - budget``; its default 0.0 is
  :class:`~kvpolicy.policies.full.FullCache` here), as every compressing policy of kvpolicy. A
  fractional budget never resolves below ``window + 8`` entries (capped at the prompt), as SnapKV's
  and Expected Attention's floors keep short chat prompts meaningful; a token budget is exact.
* ``window = 0``: kvpress keeps no window and no sinks. The official ``QFiltersCache`` always keeps
  the ``window_length`` most recent entries (its example: 64); ``window`` does that (by original
  position), scored ``+inf``.

Deviations: compression happens at prefill, as kvpress's press does; the official cache instead
evicts while generating (one entry a step once it holds ``max_length``), which is not implemented. The
calibration subsample is drawn with a seeded generator (the official script's is unseeded), over
kvpolicy's calibration prompts (the official script reads 2048-token fineweb sequences; kvpolicy
reads no data set, shared or downloaded).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr, model_validator

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.policies.presets import CachePreset
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: Entries chosen by score that a fractional budget leaves besides the window (SnapKV's window).
MIN_SCORED = 8
#: Calibration tokens whose queries enter the SVD (the official ``--num_svd_samples``).
DEFAULT_SVD_SAMPLES = 3000
#: The file ``kvpolicy calibrate --qfilters`` writes, and the name of the filters a packaged model ships.
FILTERS_FILE = "qfilters_filters.json"
#: The command that makes filters, for error messages.
CALIBRATE_COMMAND = "kvpolicy calibrate --qfilters --model MODEL --out DIR"


# -- the method: pure functions ---------------------------------------------------------------------
def filters_from_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One layer's Q-Filters from its queries (the official ``make_filters.py``).

    Args:
        queries: ``(H_q, N, d)`` queries after RoPE of ``N`` calibration tokens, per query head.
        num_kv_heads: ``H_kv``; query head ``h`` belongs to KV head ``h // (H_q / H_kv)``.

    Returns:
        ``(H_kv, d)`` float32 filters: per query head ``-sign · v₀`` (``v₀`` the first right singular
        vector of the uncentred ``(N, d)`` matrix, ``sign = +1`` when more than half of the queries
        project positively on it), averaged over the query heads of each KV head. Computed in float64.
    """
    h_q, _, d = queries.shape
    if h_q % num_kv_heads:
        raise ValueError(f"{h_q} query heads do not split into {num_kv_heads} KV heads")
    u, _, vh = torch.linalg.svd(queries.double(), full_matrices=False)
    sign = torch.where((u[..., 0] > 0).double().mean(dim=-1) > 0.5, 1.0, -1.0)  # (H_q,)
    filters = -sign[:, None] * vh[:, 0, :]  # (H_q, d)
    return filters.view(num_kv_heads, h_q // num_kv_heads, d).mean(dim=1).float()


def qfilter_scores(key: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """kvpress's ``QFilterPress.score``: ``-(f · k)`` per KV head (higher is kept).

    Args:
        key: ``(B, H_kv, T, d)`` keys after RoPE.
        filters: ``(H_kv, d)`` this layer's filters.

    Returns:
        ``(B, H_kv, T)`` float32.
    """
    return -torch.einsum("bhtd,hd->bht", key.float(), filters.to(key.device, torch.float32))


# -- filter files -----------------------------------------------------------------------------------
def _check_filters(filters: Any, what: str) -> torch.Tensor:
    """``filters`` as a ``(layers, H_kv, d)`` float32 tensor of finite numbers, or ``ValueError`` naming it."""
    try:
        tensor = torch.as_tensor(filters, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what} must be numbers shaped (layers, KV heads, head dim): {exc}") from None
    if tensor.dim() != 3 or 0 in tensor.shape:
        raise ValueError(
            f"{what} must be shaped (layers, KV heads, head dim), got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} holds a value that is not a finite number")
    return tensor


def read_filters(path: Path | str) -> torch.Tensor:
    """``(layers, H_kv, d)`` filters from ``path``: JSON as :func:`write_filters` writes it (a policy
    config whose ``cache`` holds ``filters``), ``{"filters": [...]}`` or a bare nested list; or the
    official ``model.safetensors`` (its ``q_filters`` tensor, as ``make_filters.py`` saves it)."""
    path = Path(path)
    what = f"filters_file={str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{what} does not exist (or is not a file); make one with `{CALIBRATE_COMMAND}`")
    stat = path.stat()
    return _read_filters(str(path.resolve()), stat.st_mtime_ns, stat.st_size).clone()


@functools.lru_cache(maxsize=8)
def _read_filters(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    what = f"filters_file={path!r}"
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "q_filters" not in tensors:
            raise ValueError(f"{what} holds no 'q_filters' tensor (found {sorted(tensors)})")
        return _check_filters(tensors["q_filters"], what)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("cache", data)
        if not isinstance(data, dict) or "filters" not in data:
            raise ValueError(f"{what} holds a JSON object without 'filters' (nor a 'cache' with them)")
        data = data["filters"]
    return _check_filters(data, what)


def write_filters(path: Path | str, filters: torch.Tensor | Sequence[Any], **about: Any) -> Path:
    """Write ``filters`` ``(layers, H_kv, d)`` to ``path`` as a policy config of its own: the
    ``qfilters`` component with the filters embedded (``--policy-config PATH`` runs it at the default
    budget) and ``about`` (where they came from); ``filters_file=PATH`` reads them. The policy's name
    is the file's stem, as every config under ``kvpolicy/configs`` is named."""
    path = Path(path)
    tensor = _check_filters(filters, "filters")
    rounded = [[[round(float(v), 6) for v in head] for head in layer] for layer in tensor.tolist()]
    config = {
        "name": path.stem,
        "propagation": {"kind": "all"},
        "cache": {"kind": "qfilters", "filters": rounded},
        "about": {
            "layers": tensor.shape[0],
            "kv_heads": tensor.shape[1],
            "head_dim": tensor.shape[2],
            **about,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    return path


def packaged_filters_file(model: str) -> Path:
    """Where the filters measured for packaged model ``model`` ship (it may not exist)."""
    from kvpolicy.calibrated import CONFIGS

    return CONFIGS / model / FILTERS_FILE


def _missing(model: str | None = None) -> str:
    where = f"none ship for {model}" if model else "none ship for this model"
    return (
        f"qfilters scores keys with the model's own Q-Filters, and {where}; make them with "
        f"`{CALIBRATE_COMMAND}` (it writes DIR/{FILTERS_FILE}) and give filters_file=DIR/{FILTERS_FILE}"
    )


# -- the policy -------------------------------------------------------------------------------------
class _Loaded:
    """The loaded ``(layers, H_kv, d)`` tensor, equal by value (pydantic compares private attributes)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Loaded) or (self.tensor is None) != (other.tensor is None):
            return False
        return self.tensor is None or torch.equal(self.tensor, other.tensor)  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]


class QFiltersSettings(Settings):
    """Where the filters come from, and the window (shared by :class:`QFilters` and its preset)."""

    filters: list[list[list[float]]] | None = None
    filters_file: Path | None = None
    packaged_filters: str | None = None
    window: int = Field(0, ge=0)

    #: Settings of which one gives the filters: a user's one replaces a measured one.
    alternative_settings: ClassVar[tuple[frozenset[str], ...]] = (
        frozenset({"filters", "filters_file", "packaged_filters"}),
    )

    _loaded: _Loaded = PrivateAttr()

    @model_validator(mode="after")
    def _load(self) -> QFiltersSettings:
        given = [n for n in ("filters", "filters_file", "packaged_filters") if getattr(self, n) is not None]
        if not given:
            # Whether filters ship depends on the model, known only when the policy meets it:
            # check_model (before prefill) raises the missing-filters error.
            self._loaded = _Loaded(None)
            return self
        if len(given) > 1:
            raise ValueError(
                f"give one of filters, filters_file and packaged_filters, got {', '.join(given)}"
            )
        if self.filters is not None:
            self._loaded = _Loaded(_check_filters(self.filters, "filters"))
        elif self.filters_file is not None:
            self._loaded = _Loaded(read_filters(self.filters_file))
        else:
            path = packaged_filters_file(str(self.packaged_filters))
            if not path.is_file():
                from kvpolicy.calibrated import CONFIGS

                shipped = sorted(p.parent.name for p in CONFIGS.glob(f"*/{FILTERS_FILE}"))
                raise ValueError(
                    f"packaged_filters={self.packaged_filters!r}: {_missing(self.packaged_filters)}; "
                    f"packaged filters ship for: {', '.join(shipped) or 'none'}"
                )
            self._loaded = _Loaded(read_filters(path))
        return self

    @property
    def filter_tensor(self) -> torch.Tensor:
        """``(layers, H_kv, d)`` float32 filters; ``ValueError`` naming the calibrate command when none
        were given."""
        if self._loaded.tensor is None:
            raise ValueError(
                f"qfilters: filters_file, filters or packaged_filters: Field required: {_missing()}"
            )
        return self._loaded.tensor

    @property
    def source(self) -> str:
        """Where the filters came from, for messages."""
        if self.filters_file is not None:
            return f"filters_file={str(self.filters_file)!r}"
        if self.packaged_filters is not None:
            return f"packaged_filters={self.packaged_filters!r}"
        return "filters"


class QFilters(QFiltersSettings, SelectsTopScores, CachePolicy):
    """Keep each layer's keys with the largest projection on its KV head's query direction.

    Attributes:
        budget: entries kept per layer and KV head, window included: tokens (int, kept exactly, more
            than ``window``) or a fraction of the prompt (float, ``int(L * r)`` but at least
            ``window + 8``, at most ``L``). kvpress's ``compression_ratio`` is ``1 - budget``.
        filters: the Q-Filters themselves, per layer, per KV head, ``head_dim`` numbers (the official
            ``q_filters``: minus the sign-fixed query direction); at most one of ``filters``,
            ``filters_file`` and ``packaged_filters``. With none, the policy refuses the model before
            prefill, naming the ``kvpolicy calibrate --qfilters`` command that makes them (whether
            filters ship depends on the model, which settings do not know).
        filters_file: a file of filters, as ``kvpolicy calibrate --qfilters`` writes it
            (``OUT/qfilters_filters.json``), or the official ``model.safetensors``.
        packaged_filters: the name of a packaged model whose measured filters ship with kvpolicy
            (``SmolLM2-135M-Instruct``); what the ``qfilters`` preset uses on that model.
        window: most recent prompt entries always kept (by original position); kvpress: 0, the
            official ``QFiltersCache``: its ``window_length``.
    """

    kind = "qfilters"

    budget: Budget = 0.1

    @model_validator(mode="after")
    def _check_budget(self) -> QFilters:
        if isinstance(self.budget, int) and self.window and self.budget <= self.window:
            raise ValueError(
                f"budget ({self.budget}) must exceed window ({self.window}) to leave room for scored entries"
            )
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at
        ``window + 8``)."""
        return resolve_budget(self.budget, prompt_len, floor=self.window + MIN_SCORED)

    def check_model(self, num_layers: int) -> None:
        if self.filter_tensor.shape[0] != num_layers:
            raise ValueError(
                f"qfilters {self.source} holds filters for {self.filter_tensor.shape[0]} layers, the model has "
                f"{num_layers}; filters are made for one model (`{CALIBRATE_COMMAND}`)"
            )

    def _layer_filters(self, view: LayerView) -> torch.Tensor:
        if view.layer >= self.filter_tensor.shape[0]:
            self.check_model(view.num_layers)
        filters = self.filter_tensor[view.layer]
        h, d = view.num_kv_heads, view.key.shape[-1]
        if tuple(filters.shape) != (h, d):
            raise ValueError(
                f"qfilters {self.source}: layer {view.layer} has filters for {filters.shape[0]} KV heads of "
                f"{filters.shape[1]} dims, the model has {h} of {d}; filters are made for one model "
                f"(`{CALIBRATE_COMMAND}`)"
            )
        return filters

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 ``-(f · k)`` of every entry present; the window scores ``+inf``.

        The :class:`~kvpolicy.interfaces.ScoresKeys` contract (AdaKV wraps it), with
        :meth:`resolved_budget`.
        """
        scores = qfilter_scores(view.key, self._layer_filters(view))
        if self.window:
            recent = view.positions >= view.prompt_len - self.window  # (B, T)
            scores = scores.masked_fill(recent[:, None, :], math.inf)
        return scores


class QFiltersPreset(QFiltersSettings, CachePreset):
    """Q-Filters: keys scored by their projection on each head's query direction, full prefill.

    Fields mirror :class:`QFilters` (``kv_budget`` is its ``budget``). On the embedded
    SmolLM2-135M-Instruct the filters it ships are used; other models need
    ``kvpolicy calibrate --qfilters`` first (``filters_file``).
    """

    kind = "qfilters"
    description = "Q-Filters: keys projected on each head's query direction (Godey et al. 2025)"

    policy_class = QFilters
    settings_class = QFiltersSettings

    kv_budget: Budget = 0.1


# -- calibration: the filters of a model ------------------------------------------------------------
class _QueryProbe(CachePolicy):
    """Keeps everything; records per layer the post-RoPE queries of the prompt tokens ``keep``
    (indices into the prompt). A measuring instrument, not registered."""

    kind = "qfilters-query-probe"
    keep: list[int]

    def select(self, view: LayerView, state: RequestState) -> None:
        index = torch.tensor(self.keep, dtype=torch.long, device=view.query.device)
        queries = view.query[0].index_select(1, index).float().cpu()  # (H_q, n, d)
        state.scratch(self).setdefault("queries", {})[view.layer] = queries
        return None


def model_filters(
    model: Any,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    svd_samples: int | None = DEFAULT_SVD_SAMPLES,
    seed: int = 42,
) -> torch.Tensor:
    """``(layers, H_kv, d)`` Q-Filters of ``model`` from its post-RoPE queries on ``prompts``.

    ``svd_samples`` tokens (the official default 3000; ``None``: all) are drawn uniformly without
    replacement from all the prompts' tokens with a generator seeded by ``seed``; each prompt's full
    prefill records their queries at every layer, and :func:`filters_from_queries` makes each
    layer's filters. Memory: ``layers · H_q · samples · d`` float32 values.
    """
    from kvpolicy import compose
    from kvpolicy.generation import prefill

    ids = [torch.as_tensor(p).reshape(-1).tolist() for p in prompts]
    if not ids or not all(ids):
        raise ValueError("Q-Filters calibration needs at least one non-empty prompt")
    total = sum(len(p) for p in ids)
    if svd_samples is not None and svd_samples < 1:
        raise ValueError(f"svd_samples must be >= 1 (or None for every token), got {svd_samples}")
    n = total if svd_samples is None else min(svd_samples, total)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    per_layer: dict[int, list[torch.Tensor]] = {}
    start = 0
    for prompt in ids:
        local = [int(i) - start for i in chosen if start <= int(i) < start + len(prompt)]
        start += len(prompt)
        if not local:
            continue
        probe = _QueryProbe(keep=local)
        pre = prefill(model, torch.tensor([prompt]), compose(cache=probe))
        for layer, queries in pre.state.scratch(probe)["queries"].items():
            per_layer.setdefault(layer, []).append(queries)
    kv_heads = int(model.config.num_key_value_heads)
    return torch.stack(
        [filters_from_queries(torch.cat(per_layer[i], dim=1), kv_heads) for i in range(len(per_layer))]
    )


def calibrate_filters(
    model: Any,
    out: Path,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    svd_samples: int | None = DEFAULT_SVD_SAMPLES,
    seed: int = 42,
    command: str | None = None,
) -> Path:
    """:func:`model_filters` on ``prompts``, written to ``out/qfilters_filters.json``
    (:func:`write_filters`, with the model, the prompts, the samples and the command). Returns its path."""
    filters = model_filters(model, prompts, svd_samples, seed)
    from kvpolicy.calibrated import packaged_model_name

    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    name = packaged_model_name(model) or source
    tokens = sum(torch.as_tensor(p).numel() for p in prompts)
    return write_filters(
        Path(out) / FILTERS_FILE,
        filters,
        model=name,
        method="kvpolicy.policies.qfilters.model_filters (official make_filters.py: SVD of post-RoPE queries)",
        prompts=len(prompts),
        tokens=int(tokens),
        svd_samples=min(svd_samples, int(tokens)) if svd_samples is not None else int(tokens),
        seed=seed,
        command=command,
    )


__all__ = [
    "QFilters",
    "QFiltersPreset",
    "calibrate_filters",
    "filters_from_queries",
    "model_filters",
    "qfilter_scores",
    "read_filters",
    "write_filters",
]
