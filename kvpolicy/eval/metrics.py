"""Scores of the three benchmarks, as their reference implementations compute them.

- Needle-in-a-haystack: recall of the needle's words in the answer, 0..1 (:mod:`kvpolicy.eval.needle`).
- RULER: ``string_match_all`` (fraction of the reference strings found in the answer, case-insensitive,
  x100) for every synthetic task; ``string_match_part`` (the best single reference) for its QA tasks.
- LongBench v1: the official ``metrics.py`` (THUDM/LongBench): token F1 after SQuAD-style normalisation
  (lower case, punctuation and articles removed, whitespace collapsed), ROUGE-L F from the ``rouge``
  package (the one the official scorer calls, so scores match it), the classification, count and
  retrieval scores, and code edit similarity (``rapidfuzz``'s Levenshtein ratio, rounded to a whole
  per cent as ``fuzzywuzzy.fuzz.ratio`` does). Per sample, the best score over the reference answers.

ROUGE-L and edit similarity need the ``eval`` extra (``pip install 'kvpolicy[eval]'``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kvpolicy.eval.needle import needle_found, needle_recall

__all__ = [
    "LONGBENCH_METRICS",
    "classification_score",
    "code_sim_score",
    "count_score",
    "longbench_score",
    "needle_found",
    "needle_recall",
    "normalize_answer",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l_score",
    "string_match_all",
    "string_match_part",
]

_EXTRA_HINT = "install the evaluation extra: pip install 'kvpolicy[eval]'"


# -- RULER ----------------------------------------------------------------------------------------
def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's score for one sample: the share of ``references`` found in ``prediction``
    (case-insensitive substring), x100."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    low = prediction.lower()
    return 100.0 * sum(r.lower() in low for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA score: 100 if any reference is found in ``prediction`` (case-insensitive), else 0."""
    low = prediction.lower()
    return 100.0 * max((r.lower() in low for r in references), default=False)


# -- LongBench --------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, then the articles a/an/the, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 between the normalised prediction and reference (0..1)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_l_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F (summary level, sentences split on '.') as the official scorer gets it from ``rouge``;
    0 where ``rouge`` refuses the pair (an empty prediction), as the official scorer does."""
    try:
        from rouge import Rouge
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"ROUGE-L needs the 'rouge' package; {_EXTRA_HINT}") from exc
    try:
        scores = Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)
    except (ValueError, RecursionError):
        # The official scorer wraps this call in a bare `except: return 0.0`: an empty hypothesis
        # raises ValueError, a single "sentence" of thousands of words overflows rouge's recursion.
        return 0.0
    return float(scores["rouge-l"]["f"])


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str], **_: Any
) -> float:
    """trec: 1/k if the reference is among the k class names found in the prediction, else 0.

    Reproduces the official code exactly, including two quirks: class names that are strict
    substrings of the reference are dropped from the list while iterating it (so the name after each
    dropped one is never looked at), and the ``difflib`` fallback is unreachable (its guard compares a
    list to 0), so a prediction naming no class scores 0.
    """
    matches = [name for name in all_classes if name in prediction]
    for term in matches:  # mutating while iterating: the official behaviour, kept on purpose
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_count: share of the numbers in the prediction equal to the reference count."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """passage_retrieval_en: share of the numbers in the prediction equal to the reference paragraph."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"passage_retrieval reference {ground_truth!r} names no 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """lcc / repobench-p: edit similarity of the first prediction line that is not a comment or a
    code fence, to the reference line (``fuzz.ratio``: Indel-normalised, whole per cent, 0..1)."""
    try:
        from rapidfuzz import fuzz
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"code edit similarity needs the 'rapidfuzz' package; {_EXTRA_HINT}") from exc
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    if line == ground_truth:
        return 1.0  # fuzzywuzzy checks equality first (so two empty strings score 100)
    if not line or not ground_truth:
        return 0.0
    return round(fuzz.ratio(line, ground_truth)) / 100


LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

#: Tasks whose prediction is cut to its first line before scoring (few-shot tasks).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum"})


def longbench_score(
    task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One sample's official LongBench score, x100: the best over ``answers`` of the task's metric."""
    if task not in LONGBENCH_METRICS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(LONGBENCH_METRICS)}")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes or []))
    return 100.0 * best


def longbench_bucket(length: int) -> str:
    """LongBench-E length bucket of a record's ``length`` field: ``0-4k``, ``4-8k`` or ``8k+``."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"
