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

Other measured settings come from the same prompts: ``--duo-heads`` (a DuoAttention head map,
:func:`kvpolicy.policies.duoattention.calibrate_heads`) and ``--qfilters`` (the model's Q-Filters,
:func:`kvpolicy.policies.qfilters.calibrate_filters`).
"""

from __future__ import annotations

import argparse
import json
import math
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
from kvpolicy.storage import KVStorage


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


def search_steps(
    shape: ModelShape, rates: Sequence[float], budgets: Sequence[float], min_layer: int = 1
) -> int:
    """At most how many settings :func:`recommend` evaluates: full KV, a bisection over the layers for
    each rate (one probe of the last layer, then ``ceil(log2(span))``), and each budget."""
    span = max(1, shape.layers - 2 - min_layer + 1)
    return 1 + len(rates) * (1 + math.ceil(math.log2(span))) + len(budgets)


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


# -- calibration prompts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSample:
    """One calibration prompt.

    ``score`` maps an answer to accuracy (0-100); ``None`` means the prompt has no label and is scored
    by agreement with full KV's own answer (token F1, x100). ``answer`` holds the prompt positions of
    the answer-bearing tokens where the task knows them (for the stability curve).
    """

    input_ids: list[int]
    max_new_tokens: int
    score: Callable[[str], float] | None = None
    answer: list[int] = field(default_factory=list)


def token_positions(tokenizer: Any, input_ids: Sequence[int], text: str) -> list[int]:
    """Prompt positions of ``text``'s tokens, every occurrence. Tries ``text`` with and without a
    leading space, whole and without its first and last token (their tokenisation depends on the
    neighbours); empty when it is not found."""
    ids = list(input_ids)
    found: set[int] = set()
    for variant in (" " + text, text):
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        for inner in (toks, toks[1:-1] if len(toks) > 2 else []):
            if not inner:
                continue
            n = len(inner)
            hits = [s for s in range(len(ids) - n + 1) if ids[s : s + n] == inner]
            found.update(i for s in hits for i in range(s, s + n))
            if hits:
                break
        if found:
            break
    return sorted(found)


def needle_samples(tokenizer: Any, length: int, samples: int) -> list[CalibrationSample]:
    """Needle prompts at ``samples`` depths; accuracy 100 when the answer names the needle."""
    from kvpolicy.eval import needle

    haystack = needle.load_haystack(needle.find_haystack_dir())
    out = []
    for depth in needle.depths(samples):
        ids = needle.build_sample(tokenizer, length, depth, haystack).input_ids
        out.append(
            CalibrationSample(
                list(ids),
                30,
                lambda text: 100.0 * needle.needle_found(text),
                needle_positions(tokenizer, ids),
            )
        )
    return out


#: RULER tasks SmolLM2-135M-Instruct solves with full KV at 1-2K tokens (measured, docs/calibration.md).
DEFAULT_RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")


def ruler_samples(
    tokenizer: Any, length: int, samples: int, tasks: Sequence[str] = DEFAULT_RULER_TASKS, seed: int = 42
) -> list[CalibrationSample]:
    """``samples`` generated RULER prompts per task; accuracy is RULER's ``string_match_all``."""
    from kvpolicy.eval import ruler
    from kvpolicy.eval.metrics import string_match_all

    out = []
    for task in tasks:
        for index in range(samples):
            sample = ruler.generate_sample(task, tokenizer, length, index, seed)
            answer = sorted(
                {i for ref in sample.outputs for i in token_positions(tokenizer, sample.input_ids, ref)}
            )
            out.append(
                CalibrationSample(
                    list(sample.input_ids),
                    ruler.max_new_tokens(task),
                    lambda text, refs=tuple(sample.outputs): string_match_all(text, refs),
                    answer,
                )
            )
    return out


def prompt_samples(
    tokenizer: Any, folder: Path, samples: int | None = None, max_new_tokens: int = 64
) -> list[CalibrationSample]:
    """Every ``*.txt`` file in ``folder`` (sorted; the first ``samples``) as a user turn of the chat
    template; unlabelled, so accuracy is agreement with full KV's answer."""
    from kvpolicy.cli import read_prompt_file
    from kvpolicy.generation import encode_prompt

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--prompts {str(folder)!r} is not a folder")
    files = sorted(folder.glob("*.txt"))[:samples]
    if not files:
        raise ValueError(f"--prompts {str(folder)!r} holds no .txt file")
    out = []
    for path in files:
        ids = encode_prompt(tokenizer, read_prompt_file(path))
        if len(ids) < 16:
            raise ValueError(
                f"prompt file {str(path)!r} has {len(ids)} tokens; calibration needs at least 16"
            )
        out.append(CalibrationSample(list(ids), max_new_tokens))
    return out


# -- running it ----------------------------------------------------------------------------------
def evaluator(
    model: Any,
    tokenizer: Any,
    samples: Sequence[CalibrationSample],
    batch_size: int | None = 8,
    storage: Any = None,
) -> Callable[..., float]:
    """Mean accuracy (0-100) of a FastKV setting ``(tsp_layer, tsp_rate, kv_budget)`` on ``samples``,
    with entries stored as ``storage`` says (``None``: the model's dtype; a call may pass its own as a
    fourth argument, :class:`~kvpolicy.storage.KVStorage` or what its ``parse`` reads).

    Unlabelled samples are scored against full KV's greedy answer (the model's own dtype), generated
    once on first use. Samples are generated ``batch_size`` at a time (the same answers as one by one).
    """
    from kvpolicy import compose
    from kvpolicy.eval.metrics import qa_f1_score
    from kvpolicy.generation import generate
    from kvpolicy.policies import TSP, FullCache, SnapKV

    references: dict[int, str] = {}

    def answers(policy: Policy) -> list[str]:
        """Every sample's answer, in batches of samples that share an answer length."""
        texts: dict[int, str] = {}
        for new_tokens in dict.fromkeys(s.max_new_tokens for s in samples):
            group = [i for i, s in enumerate(samples) if s.max_new_tokens == new_tokens]
            outs = generate(
                model,
                tokenizer,
                input_ids=[samples[i].input_ids for i in group],
                policy=policy,
                max_new_tokens=new_tokens,
                batch_size=batch_size,
            )
            texts.update((i, o.text) for i, o in zip(group, outs, strict=True))
        return [texts[i] for i in range(len(samples))]

    def evaluate(layer: int | None, rate: float, budget: float, width: Any = storage) -> float:
        prop = TSP(layer=layer, rate=rate) if layer is not None and rate < 1.0 else None
        cache = SnapKV(budget=budget) if budget < 1.0 else FullCache()
        policy = compose(prop, cache, width)
        texts = answers(policy)
        if any(s.score is None for s in samples) and not references:
            plain = prop is None and budget >= 1.0 and not policy.storage.quantized
            full = texts if plain else answers(compose())
            references.update(enumerate(full))
        total = 0.0
        for i, (sample, text) in enumerate(zip(samples, texts, strict=True)):
            total += (
                sample.score(text) if sample.score is not None else 100.0 * qa_f1_score(text, references[i])
            )
        return total / len(samples)

    return evaluate


#: Storage widths ``--kv-bytes`` weighs (16: the model's dtype).
KV_BYTES_WIDTHS = ("16", "int8", "int4", "int2")


def kv_bytes_per_token(shape: ModelShape, storage: Any, bytes_per_elem: int) -> float:
    """KV bytes one prompt token takes over every layer and KV head when all are kept, stored as
    ``storage`` says: the unit of ``--kv-bytes``."""
    from kvpolicy.bench.costmodel import kv_element_bytes

    return (
        shape.layers * shape.kv_heads * 2 * shape.head_dim * kv_element_bytes(storage, shape, bytes_per_elem)
    )


def choose_storage(
    evaluate: Callable[..., float],
    shape: ModelShape,
    bytes_per_elem: int,
    kv_bytes: float,
    widths: Sequence[str] = KV_BYTES_WIDTHS,
) -> dict[str, Any]:
    """Budget and width together for ``kv_bytes`` bytes of KV per prompt token: each width gets the
    SnapKV budget those bytes buy (``kv_bytes / bytes per token at that width``, at most the whole prompt;
    a width that cannot keep 1 % of the prompt is skipped), each candidate is measured with ``evaluate``
    (:func:`evaluator`), and the most accurate wins (ties: the wider storage, which risks less on prompts
    the calibration did not see). Returns the candidates and the choice."""
    if not kv_bytes > 0:
        raise ValueError(f"--kv-bytes must be > 0 bytes per token, got {kv_bytes}")
    points = []
    for width in widths:
        per_token = kv_bytes_per_token(shape, width, bytes_per_elem)
        budget = min(1.0, kv_bytes / per_token)
        if budget < 0.01:
            continue
        budget = math.floor(budget * 1000) / 1000  # never above the bytes given
        accuracy = evaluate(None, 1.0, budget, width)
        points.append(
            {
                "kv_bits": width,
                "kv_budget": budget,
                "bytes_per_token": round(budget * per_token, 1),
                "accuracy": accuracy,
            }
        )
    if not points:
        least = kv_bytes_per_token(shape, widths[-1], bytes_per_elem) * 0.01
        raise ValueError(
            f"--kv-bytes {kv_bytes:g} cannot keep 1 % of the prompt at any width (int2 needs {least:.0f} bytes per token)"
        )
    rank = {w: i for i, w in enumerate(widths)}
    best = max(points, key=lambda p: (round(p["accuracy"], 6), -rank[p["kv_bits"]]))
    return {"kv_bytes": kv_bytes, "candidates": points, "recommended": best}


def needle_evaluator(
    model: Any, tokenizer: Any, length: int, samples: int
) -> Callable[[int | None, float, float], float]:
    """Accuracy (0-100: needle found, sandwich and Dolores Park) of a FastKV setting on needle prompts."""
    return evaluator(model, tokenizer, needle_samples(tokenizer, length, samples))


def calibration_samples(
    tokenizer: Any,
    task: str = "needle",
    length: int = 1500,
    samples: int = 5,
    tasks: Sequence[str] | None = None,
    prompts: Path | None = None,
    seed: int = 42,
) -> list[CalibrationSample]:
    """The prompts of a calibration run: ``prompts`` (a folder of .txt files) if given, else ``task``."""
    if prompts is not None:
        return prompt_samples(tokenizer, prompts, samples)
    if task == "needle":
        return needle_samples(tokenizer, length, samples)
    if task == "ruler":
        return ruler_samples(tokenizer, length, samples, tuple(tasks or DEFAULT_RULER_TASKS), seed)
    raise ValueError(f"unknown calibration task {task!r}; known: needle, ruler")


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
    task: str = "needle",
    tasks: Sequence[str] | None = None,
    prompts: Path | None = None,
    seed: int = 42,
    quiet: bool = False,
    storage: Any = None,
) -> dict[str, Any]:
    """Stability curve, recommendation, plots and config into ``out``; returns the summary. ``storage``:
    every setting searched stores its entries so (``kv_bits``; the config records it).

    Progress goes to stderr (a bar in a terminal, plain lines elsewhere) unless ``quiet``: first the
    per-layer importance of each sample, then the search, whose length is known only as a bound
    (:func:`search_steps`), so its estimate is on the safe side.

    ``task`` is ``"needle"`` (``samples`` depths at ``length`` tokens) or ``"ruler"`` (``samples``
    prompts per RULER task in ``tasks``); ``prompts``, a folder of ``.txt`` files, replaces both and
    is scored by agreement with full KV.
    """
    from kvpolicy.progress import track

    out.mkdir(parents=True, exist_ok=True)
    prepared = calibration_samples(tokenizer, task, length, samples, tasks, prompts, seed)
    curves = []
    with track("calibrate: importance per layer", len(prepared), quiet=quiet) as progress:
        for s in prepared:
            curves.append(stability(layer_scores(model, s.input_ids), answer=s.answer))
            progress.advance()
    n = len(curves[0]["recall"])
    mean: dict[str, list[float]] = {
        "recall": [sum(c["recall"][i] for c in curves) / len(curves) for i in range(n)]
    }
    with_answer = [c for c in curves if c["answer_recall"]]
    mean["answer_recall"] = (
        [sum(c["answer_recall"][i] for c in with_answer) / len(with_answer) for i in range(n)]
        if with_answer
        else []
    )
    mean_length = round(sum(len(s.input_ids) for s in prepared) / len(prepared))
    shape = ModelShape.from_config(model.config)
    evaluate = evaluator(model, tokenizer, prepared, storage=storage)
    with track("calibrate: search", search_steps(shape, rates, budgets), quiet=quiet) as progress:

        def tracked(layer: int | None, rate: float, budget: float) -> float:
            progress.describe(f"TSP layer {layer}, rate {rate}, budget {budget}")
            accuracy = evaluate(layer, rate, budget)
            progress.advance()
            return accuracy

        rec = recommend(tracked, shape, mean_length, rates, budgets, tolerance)
        progress.advance(max(0, progress.total - progress.done))  # the search ended early
    summary: dict[str, Any] = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "task": "prompts" if prompts is not None else task,
        "tasks": list(tasks or DEFAULT_RULER_TASKS) if prompts is None and task == "ruler" else None,
        "prompts": str(prompts) if prompts is not None else None,
        "length": mean_length,
        "samples": len(prepared),
        "accuracy": "agreement with full KV (token F1)" if prompts is not None else "task score",
        "stability": mean,
        "full_accuracy": rec.full_accuracy,
        "tolerance": rec.tolerance,
        "recommended": asdict(rec.choice) if rec.choice else None,
        "points": [asdict(p) for p in rec.points],
        "command": command,
    }
    width = KVStorage.parse(storage)
    if width.quantized:
        summary["kv_bits"] = width.label
    (out / "calibration.json").write_text(json.dumps(summary, indent=2))
    if rec.choice:
        config = choice_config(rec.choice)
        if width.quantized:
            config["kv_bits"] = width.label
        (out / "policy.json").write_text(json.dumps(config, indent=2))
    plot_calibration(out)
    return summary


def _run_kv_bytes(args: argparse.Namespace, model: Any, tokenizer: Any, command: str) -> int:
    """``calibrate --kv-bytes N``: :func:`choose_storage` on the run's prompts; the choice as a policy config."""
    prepared = calibration_samples(
        tokenizer, args.task, args.length, args.samples, args.ruler_tasks, args.prompts, args.seed
    )
    shape = ModelShape.from_config(model.config)
    elem = next(model.parameters()).element_size()
    found = choose_storage(evaluator(model, tokenizer, prepared), shape, elem, args.kv_bytes)
    best = found["recommended"]
    found.update(
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        full_bytes_per_token=kv_bytes_per_token(shape, None, elem),
        samples=len(prepared),
        length=round(sum(len(s.input_ids) for s in prepared) / len(prepared)),
        command=command,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_bytes.json").write_text(json.dumps(found, indent=2))
    config = {"policy": "snapkv", "kv_budget": best["kv_budget"], "kv_bits": best["kv_bits"]}
    (args.out / "kv_bytes_policy.json").write_text(json.dumps(config, indent=2))
    for p in found["candidates"]:
        print(
            f"{p['kv_bits']:>6}: kv_budget {p['kv_budget']:<6} {p['bytes_per_token']:>8.0f} B/token  accuracy {p['accuracy']:.0f}"
        )
    print(
        f"recommended for {args.kv_bytes:g} bytes per token: SnapKV kv_budget {best['kv_budget']} at "
        f"{best['kv_bits']} (accuracy {best['accuracy']:.0f}). Config: {args.out / 'kv_bytes_policy.json'}"
    )
    return 0


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
        what = "needle" if summary.get("task") == "needle" else "answer"
        ax.plot(mean["answer_recall"], marker="s", label=f"{what} tokens in top-10%")
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
    from kvpolicy.cli import SUBCOMMANDS

    p = sub.add_parser("calibrate", help=SUBCOMMANDS["calibrate"][1])
    p.add_argument(
        "--task", choices=["needle", "ruler"], default="needle", help="calibration prompts (default needle)"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        help="folder of .txt prompts instead of --task; scored by agreement with full KV's answer",
    )
    p.add_argument(
        "--ruler-tasks",
        nargs="+",
        help=f"RULER tasks for --task ruler (default: {' '.join(DEFAULT_RULER_TASKS)})",
    )
    p.add_argument("--seed", type=int, default=42, help="RULER generator seed (default 42)")
    p.add_argument("--length", type=int, default=1500, help="prompt length in tokens (default 1500)")
    p.add_argument(
        "--samples",
        type=int,
        default=5,
        help="prompts per setting: needle depths, prompts per RULER task, or prompt files (default 5)",
    )
    p.add_argument(
        "--tolerance", type=float, default=1.0, help="accuracy points below full KV allowed (default 1)"
    )
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--duo-heads",
        action="store_true",
        help="instead of the FastKV search, score each KV head for DuoAttention on the same prompts "
        "and write OUT/duo_head_map.json and OUT/duo_policy.json",
    )
    p.add_argument("--duo-sink", type=int, default=64, help="--duo-heads sink tokens (default 64)")
    p.add_argument("--duo-recent", type=int, default=256, help="--duo-heads recent tokens (default 256)")
    p.add_argument(
        "--qfilters",
        action="store_true",
        help="instead of the FastKV search, measure the model's Q-Filters (the SVD of its queries) on the "
        "same prompts and write OUT/qfilters_filters.json, for the qfilters policy's --filters-file",
    )
    p.add_argument(
        "--qfilters-samples",
        type=int,
        default=3000,
        help="--qfilters: calibration tokens whose queries enter the SVD, drawn with --seed (default 3000, "
        "the official make_filters.py's)",
    )
    p.add_argument(
        "--kv-bits",
        help="run the FastKV search with entries stored at this width (16, 8, fp8, 4, 2, kivi4, kivi2; default 16)",
    )
    p.add_argument(
        "--kv-bytes",
        type=float,
        help="instead of the FastKV search, choose SnapKV's budget and the storage width together for this "
        "many bytes of KV per prompt token (all layers and KV heads), measured on the same prompts; "
        "writes OUT/kv_bytes.json and OUT/kv_bytes_policy.json",
    )
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
    if sum(bool(x) for x in (args.duo_heads, args.qfilters, args.kv_bytes is not None)) > 1:
        raise ValueError("--duo-heads, --qfilters and --kv-bytes are separate runs; give one")
    storage = KVStorage.parse(args.kv_bits)  # None: the model's dtype; a bad width is named
    if args.kv_bytes is not None:
        return _run_kv_bytes(args, model, tokenizer, command)
    if args.qfilters:
        from kvpolicy.policies.qfilters import calibrate_filters

        if args.qfilters_samples < 1:
            raise ValueError(f"--qfilters-samples must be >= 1, got {args.qfilters_samples}")
        prepared = calibration_samples(
            tokenizer, args.task, args.length, args.samples, args.ruler_tasks, args.prompts, args.seed
        )
        path = calibrate_filters(
            model,
            args.out,
            [s.input_ids for s in prepared],
            args.qfilters_samples,
            args.seed,
            command=command,
        )
        print(
            f"Q-Filters: {path}; run them with --policy qfilters --filters-file {path} "
            f"(or --policy-config {path})"
        )
        return 0
    if args.duo_heads:
        from kvpolicy.policies.duoattention import calibrate_heads

        prepared = calibration_samples(
            tokenizer, args.task, args.length, args.samples, args.ruler_tasks, args.prompts, args.seed
        )
        prompts = [s.input_ids for s in prepared]
        path = calibrate_heads(
            model, tokenizer, args.out, prompts, args.duo_sink, args.duo_recent, command=command
        )
        print(f"DuoAttention head map: {path}; config: {args.out / 'duo_policy.json'}")
        return 0
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
        task=args.task,
        tasks=args.ruler_tasks,
        prompts=args.prompts,
        seed=args.seed,
        storage=storage,
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
