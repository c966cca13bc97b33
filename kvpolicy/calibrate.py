"""``kvpolicy calibrate``: where token importance stabilises in *this* model, and which TSP layer,
TSP rate and KV budget keep accuracy at the best predicted speed.

The FastKV paper puts TSP at about mid-depth because importance stabilises there in 8B models. That
does not transfer (on SmolLM2-135M, layer 14 of 30 loses a needle that layer 22 keeps), so this
measures it:

1. **Importance stability**: for each layer, the recall of its window-score top-k against the top-k
   of the last quarter of layers (the tokens the final layers attend to), and the share of the
   answer-bearing tokens (the needle) in its top-k.
2. **Recommendation**: for each TSP rate, the earliest TSP layer whose accuracy stays within
   ``tolerance`` points of full KV (binary search: later layers keep more), then the smallest KV
   budget for the chosen setting; the cost model predicts each point's prefill speed-up and KV size.
3. A ready policy config (JSON) and the command that reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kvpolicy.bench.costmodel import ModelShape, decode_bytes_per_token, prefill_flops
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.scoring import snapkv_scores
from kvpolicy.state import RequestState


class ScoreProbe(CachePolicy):
    """Keeps every entry and records each layer's SnapKV-style prefix scores, summed over KV heads,
    in the request state (``state.scratch(probe)["scores"]``). A measuring instrument, not registered."""

    kind = "score-probe"
    window: int = 8
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        window = min(self.window, view.num_tokens)
        scores = snapkv_scores(view.window_attention(window), window, self.kernel, self.pooling)
        state.scratch(self).setdefault("scores", {})[view.layer] = scores.sum(dim=1)[0].cpu()
        return None


def layer_scores(
    model: Any, input_ids: Sequence[int] | torch.Tensor, probe: ScoreProbe | None = None
) -> torch.Tensor:
    """``(layers, P)`` prefix scores of one prompt at every layer (full prefill, nothing cut)."""
    from kvpolicy import compose
    from kvpolicy.generation import prefill

    probe = probe or ScoreProbe()
    pre = prefill(model, input_ids, compose(cache=probe))
    recorded = pre.state.scratch(probe)["scores"]
    return torch.stack([recorded[i] for i in range(len(recorded))])


def stability(
    scores: torch.Tensor, top_frac: float = 0.1, answer: Sequence[int] = (), ref_layers: int | None = None
) -> dict[str, list[float]]:
    """Per-layer stability of the token ranking.

    Args:
        scores: ``(layers, P)`` prefix scores per layer.
        top_frac: size of the top set, as a fraction of ``P`` (at least one token).
        answer: positions (< P) of answer-bearing tokens, if the task knows them.
        ref_layers: how many final layers form the reference (default: the last quarter).

    Returns:
        ``{"recall": [...], "answer_recall": [...]}``, one value per layer: overlap of the layer's
        top set with the reference top set (mean of the normalised reference layers' scores), and the
        share of answer positions in the layer's top set (empty when no answer is given).
    """
    n_layers, p = scores.shape
    k = max(1, int(p * top_frac))
    ref_layers = ref_layers or max(1, n_layers // 4)
    normed = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    reference = set(normed[-ref_layers:].mean(dim=0).topk(k).indices.tolist())
    tops = scores.topk(k, dim=-1).indices.tolist()
    recall = [len(reference & set(t)) / k for t in tops]
    answer_set = set(answer)
    answer_recall = [len(answer_set & set(t)) / len(answer_set) for t in tops] if answer_set else []
    return {"recall": recall, "answer_recall": answer_recall}


def needle_positions(tokenizer: Any, input_ids: Sequence[int]) -> list[int]:
    """Prompt positions of the needle's tokens (its interior, where tokenisation is context-free)."""
    from kvpolicy.eval.needle import NEEDLE

    inner = tokenizer(" " + NEEDLE, add_special_tokens=False)["input_ids"][1:-1]
    ids = list(input_ids)
    for start in range(len(ids) - len(inner) + 1):
        if ids[start : start + len(inner)] == inner:
            return list(range(start, start + len(inner)))
    return []


# -- recommendation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One evaluated setting: accuracy (0-100) and the cost model's prediction."""

    tsp_layer: int | None
    tsp_rate: float
    kv_budget: float
    accuracy: float
    prefill_speedup: float
    kv_fraction: float


@dataclass
class Recommendation:
    full_accuracy: float
    tolerance: float
    choice: Point | None
    points: list[Point] = field(default_factory=list)


def earliest_layer(accepts: Callable[[int], bool], low: int, high: int) -> int | None:
    """Smallest layer in ``[low, high]`` that ``accepts``, assuming acceptance is monotone in depth
    (a later TSP layer sees more of the model before cutting). ``None`` if even ``high`` fails."""
    if not accepts(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if accepts(mid):
            high = mid
        else:
            low = mid + 1
    return low


def predicted(
    shape: ModelShape, length: int, tsp_layer: int | None, tsp_rate: float, kv_budget: float
) -> tuple[float, float]:
    """(prefill speed-up, KV bytes fraction) the cost model predicts for a FastKV setting."""
    full_tokens = [length] * shape.layers
    kept = max(1, int(length * tsp_rate))
    tokens = [length if tsp_layer is None or i <= tsp_layer else kept for i in range(shape.layers)]
    budget = max(1, int(length * kv_budget))
    kv = [min(budget, t) for t in tokens]
    speedup = prefill_flops(shape, full_tokens) / prefill_flops(shape, tokens)
    kv_bytes = decode_bytes_per_token(shape, kv, 2) - decode_bytes_per_token(shape, [0] * shape.layers, 2)
    full_bytes = decode_bytes_per_token(shape, full_tokens, 2) - decode_bytes_per_token(
        shape, [0] * shape.layers, 2
    )
    return speedup, kv_bytes / full_bytes


def recommend(
    evaluate: Callable[[int | None, float, float], float],
    shape: ModelShape,
    length: int,
    rates: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
    budgets: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    tolerance: float = 1.0,
    min_layer: int = 1,
) -> Recommendation:
    """Search TSP layer, rate and KV budget with ``evaluate(layer, rate, budget) -> accuracy`` (0-100).

    For each rate (ascending), the earliest layer within ``tolerance`` of full KV; among those the
    setting with the largest predicted prefill speed-up; then the smallest budget that still holds.
    """
    cache: dict[tuple[int | None, float, float], float] = {}

    def acc(layer: int | None, rate: float, budget: float) -> float:
        key = (layer, rate, budget)
        if key not in cache:
            cache[key] = evaluate(layer, rate, budget)
        return cache[key]

    full = acc(None, 1.0, 1.0)
    ok = lambda a: a >= full - tolerance  # noqa: E731
    candidates: list[tuple[int, float]] = []
    for rate in sorted(rates):
        layer = earliest_layer(
            lambda layer, rate=rate: ok(acc(layer, rate, 1.0)), min_layer, shape.layers - 2
        )
        if layer is not None:
            candidates.append((layer, rate))
    choice = None
    if candidates:
        layer, rate = max(candidates, key=lambda c: predicted(shape, length, c[0], c[1], 1.0)[0])
        budget = next((b for b in sorted(budgets) if ok(acc(layer, rate, b))), 1.0)
        speed, kv = predicted(shape, length, layer, rate, budget)
        choice = Point(layer, rate, budget, acc(layer, rate, budget), speed, kv)
    points = [
        Point(k[0], k[1], k[2], a, *predicted(shape, length, k[0], k[1], k[2])) for k, a in cache.items()
    ]
    return Recommendation(full_accuracy=full, tolerance=tolerance, choice=choice, points=points)


def choice_config(choice: Point) -> dict[str, Any]:
    """The recommended setting as a policy config for ``get_policy`` / ``--policy-config``."""
    return {
        "policy": "fastkv",
        "tsp_layer": choice.tsp_layer,
        "tsp_rate": choice.tsp_rate,
        "kv_budget": choice.kv_budget,
    }


# -- running it ----------------------------------------------------------------------------------
def needle_evaluator(
    model: Any, tokenizer: Any, length: int, samples: int
) -> Callable[[int | None, float, float], float]:
    """Accuracy (0-100: needle found, sandwich and Dolores Park) of a FastKV setting on needle prompts."""
    from kvpolicy import compose
    from kvpolicy.eval import needle
    from kvpolicy.generation import generate
    from kvpolicy.policies import TSP, FullCache, SnapKV

    haystack = needle.load_haystack(needle.find_haystack_dir())
    prompts = [needle.build_sample(tokenizer, length, d, haystack).input_ids for d in needle.depths(samples)]

    def evaluate(layer: int | None, rate: float, budget: float) -> float:
        prop = TSP(layer=layer, rate=rate) if layer is not None and rate < 1.0 else None
        cache = SnapKV(budget=budget) if budget < 1.0 else FullCache()
        policy: Policy = compose(prop, cache)
        found = 0
        for ids in prompts:
            out = generate(model, tokenizer, input_ids=ids, policy=policy, max_new_tokens=30)
            found += needle.needle_found(out.text)
        return 100.0 * found / len(prompts)

    return evaluate


def run_calibration(
    model: Any,
    tokenizer: Any,
    out: Path,
    length: int = 1500,
    samples: int = 5,
    tolerance: float = 1.0,
    rates: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
    budgets: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    command: str | None = None,
) -> dict[str, Any]:
    """Stability curve, recommendation, plots and config into ``out``; returns the summary."""
    from kvpolicy.eval import needle

    out.mkdir(parents=True, exist_ok=True)
    haystack = needle.load_haystack(needle.find_haystack_dir())
    curves = []
    for depth in needle.depths(samples):
        ids = needle.build_sample(tokenizer, length, depth, haystack).input_ids
        curves.append(stability(layer_scores(model, ids), answer=needle_positions(tokenizer, ids)))
    n = len(curves[0]["recall"])
    mean = {
        key: [sum(c[key][i] for c in curves) / len(curves) for i in range(n)] if curves[0][key] else []
        for key in ("recall", "answer_recall")
    }
    shape = ModelShape.from_config(model.config)
    rec = recommend(
        needle_evaluator(model, tokenizer, length, samples), shape, length, rates, budgets, tolerance
    )
    summary: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "task": "needle",
        "length": length,
        "samples": samples,
        "stability": mean,
        "full_accuracy": rec.full_accuracy,
        "tolerance": rec.tolerance,
        "recommended": asdict(rec.choice) if rec.choice else None,
        "points": [asdict(p) for p in rec.points],
        "command": command,
    }
    (out / "calibration.json").write_text(json.dumps(summary, indent=2))
    if rec.choice:
        (out / "policy.json").write_text(json.dumps(choice_config(rec.choice), indent=2))
    plot_calibration(out)
    return summary


def plot_calibration(out: Path) -> None:
    """Stability and Pareto plots from ``out/calibration.json`` (no-op without matplotlib)."""
    summary = json.loads((out / "calibration.json").read_text())
    mean = summary["stability"]
    points = [Point(**p) for p in summary["points"]]
    choice = Point(**summary["recommended"]) if summary["recommended"] else None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(mean["recall"], marker="o", label="top-10% recall vs last-quarter layers")
    if mean["answer_recall"]:
        ax.plot(mean["answer_recall"], marker="s", label="needle tokens in top-10%")
    ax.set_xlabel("layer")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p in points:
        ax.scatter(p.prefill_speedup, p.accuracy, s=20, color="tab:blue")
    if choice:
        ax.scatter(choice.prefill_speedup, choice.accuracy, s=80, color="tab:red", label="recommended")
    floor = summary["full_accuracy"] - summary["tolerance"]
    ax.axhline(floor, color="grey", lw=0.8, ls="--", label="full KV - tolerance")
    ax.set_xlabel("predicted prefill speed-up")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


def add_parser(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("calibrate", help="choose TSP layer, TSP rate and KV budget for a model, measured")
    p.add_argument("--task", choices=["needle"], default="needle")
    p.add_argument("--length", type=int, default=1500, help="prompt length in tokens (default 1500)")
    p.add_argument("--samples", type=int, default=5, help="prompts (needle depths) per setting (default 5)")
    p.add_argument(
        "--tolerance", type=float, default=1.0, help="accuracy points below full KV allowed (default 1)"
    )
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--out", type=Path, required=True)
    model_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvpolicy.cli import load_from_args

    if args.samples < 1 or args.length < 64:
        raise ValueError(f"--samples must be >= 1 and --length >= 64, got {args.samples} and {args.length}")
    bad = [r for r in [*args.rates, *args.budgets] if not 0 < r <= 1]
    if bad:
        raise ValueError(f"--rates and --budgets are fractions in (0, 1]; got {bad}")
    model, tokenizer = load_from_args(args)
    command = "kvpolicy " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = run_calibration(
        model,
        tokenizer,
        args.out,
        args.length,
        args.samples,
        args.tolerance,
        args.rates,
        args.budgets,
        command,
    )
    choice = summary["recommended"]
    if choice is None:
        print(f"no TSP setting kept accuracy within {args.tolerance} points of full KV; see {args.out}")
        return 0
    print(
        f"recommended: TSP layer {choice['tsp_layer']}, rate {choice['tsp_rate']}, KV budget {choice['kv_budget']} "
        f"(accuracy {choice['accuracy']:.0f} vs full {summary['full_accuracy']:.0f}; predicted prefill "
        f"{choice['prefill_speedup']:.2f}x, KV {choice['kv_fraction']:.0%} of full). Config: {args.out / 'policy.json'}"
    )
    return 0
