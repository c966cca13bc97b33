"""RULER's synthetic tasks (Hsieh et al. 2024), generated on the fly, seeded and deterministic.

Task definitions follow NVIDIA/RULER (``scripts/synthetic.yaml``, ``scripts/data/synthetic/*.py``,
``constants.py``): the same templates and answer prefixes, needle format, haystack kinds (the repeated
noise sentence, Paul Graham essays, distractor needles), key and value kinds (adjective-noun words
from ``wonderwords``' lists, 7-digit numbers, UUIDs), needle counts, variable-tracking chains, common-
and frequent-word lists. A sample is filled to the requested length with the model's own tokenizer:
the haystack size is the largest whose prompt (chat template and answer prefix included) fits.

Where this differs from the published generator (also listed in docs/evaluation.md):

- ``length`` is the prompt length in tokens; RULER's ``max_seq_length`` also counts the tokens to
  generate. Prompts are wrapped in the model's chat template, with RULER's answer prefix opening the
  assistant turn (RULER formats a model-specific template the same way).
- Every sample is generated from its own seed (``seed``, task, length, index), so it does not depend
  on which other samples were generated or in what order (RULER draws from one global stream).
- Essay sentences are split with a regular expression, not NLTK's punkt.
- Keys are unique within a sample and distractor keys never equal a queried key (RULER does not check).
- vt's one-shot example has ``clamp(length // 200, 5, 20)`` noise sentences (RULER fits it to 500
  tokens, which alone would overflow short prompts); its variables have 3 letters as in RULER.
- Answers are capped at 64 new tokens (as in FastKV's reference): niah 64 (RULER 128), cwe 64 (120), vt 30,
  fwe 50.
- cwe beyond ``wonderwords``' 8,166 words adds adjective-noun compounds (RULER switches to another list).
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
    "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

#: RULER's tokens_to_generate per task family, and the FastKV reference's cap (greedy, <= 64 new tokens).
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
MAX_NEW_TOKENS_CAP = 64


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> dict[str, Any]:
    return {"kind": "niah", "haystack": haystack, "key": key, "value": value, "k": max(k, q), "v": v, "q": q}


#: The 11 synthetic tasks of RULER's ``synthetic.yaml`` (its two QA tasks need SQuAD/HotpotQA files).
TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": {"kind": "vt", "chains": 1, "hops": 4},
    "cwe": {"kind": "cwe", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"kind": "fwe", "alpha": 2.0, "coded_wordlen": 6},
}
# 40 insertion depths (percent), as RULER's np.round(np.linspace(0, 100, 40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]


def max_new_tokens(task: str) -> int:
    return min(TOKENS_TO_GENERATE[TASKS[task]["kind"]], MAX_NEW_TOKENS_CAP)


def needs_essay(task: str) -> bool:
    return TASKS[task].get("haystack") == "essay"


@dataclass(frozen=True)
class RulerSample:
    """One generated sample: the prompt's token ids and text, and the strings the answer must contain."""

    task: str
    length: int
    index: int
    input_ids: list[int]
    prompt: str
    answer_prefix: str
    outputs: list[str]
    haystack_size: int


# -- word lists -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _wonderwords() -> tuple[list[str], list[str], list[str]]:
    """Nouns, adjectives and verbs: the word lists RULER reads from the ``wonderwords`` package."""
    from importlib import resources

    try:
        assets = resources.files("wonderwords") / "assets"
    except ModuleNotFoundError as exc:
        raise ImportError(
            "RULER's word lists come from the 'wonderwords' package; "
            "install the evaluation extra: pip install 'kvpolicy[eval]'"
        ) from exc

    def read(name: str) -> list[str]:
        return [w.rstrip() for w in (assets / name).read_text(encoding="utf-8").splitlines() if w.strip()]

    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


@lru_cache(maxsize=1)
def _cwe_words() -> list[str]:
    nouns, adjs, verbs = _wonderwords()
    return sorted(set(nouns + adjs + verbs))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        nouns, adjs, _ = _wonderwords()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}")


def _essay_words(essay: str) -> list[str]:
    return re.sub(r"\s+", " ", essay).strip().split(" ")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _insert_in_essay(rng: random.Random, words: list[str], n: int, needles: list[str]) -> str:
    """RULER's essay haystack: the first ``n`` words (repeated if needed), needles put between
    sentences at depths drawn from the 40 RULER depths."""
    reps = -(-n // len(words))
    text = " ".join((words * reps)[:n])
    sents = _SENTENCE_END.split(text.strip())
    cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
    bounds = [0, *cuts, len(sents)]
    parts: list[str] = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sents[bounds[i - 1] : bounds[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


# -- the four task families: make(n) -> (user text, answer prefix, outputs) -------------------------
Made = tuple[str, str, list[str]]


def _niah_maker(spec: dict[str, Any], seed: str, essay: list[str] | None) -> Callable[[int], Made]:
    def make(n: int) -> Made:
        rng = random.Random(seed)
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(spec["k"]):
            key = _random_value(rng, spec["key"])
            while key in keys:
                key = _random_value(rng, spec["key"])
            keys.append(key)
            vals = [_random_value(rng, spec["value"]) for _ in range(spec["v"])]
            values.append(vals)
            needles += [NEEDLE.format(type_v=spec["value"], key=key, value=val) for val in vals]
        rng.shuffle(needles)
        picked = rng.sample(range(spec["k"]), spec["q"])
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        if spec["haystack"] == "essay":
            assert essay is not None
            context = _insert_in_essay(rng, essay, n, needles)
        else:
            if spec["haystack"] == "noise":
                sentences = [NOISE] * n
            else:  # distractor needles with keys other than the real ones
                sentences = []
                for _ in range(n):
                    key = _random_value(rng, spec["key"])
                    while key in keys:
                        key = _random_value(rng, spec["key"])
                    value = _random_value(rng, spec["value"])
                    sentences.append(NEEDLE.format(type_v=spec["value"], key=key, value=value))
            for index, needle in zip(
                sorted(rng.sample(range(n), len(needles)), reverse=True), needles, strict=True
            ):
                sentences.insert(index, needle)
            context = "\n".join(sentences)
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, spec["value"]
        if spec["q"] * spec["v"] == 1:  # RULER's singular rewrite of the template
            template, prefix = (_singular(t) for t in (template, prefix))
            type_v = type_v[:-1]
        return (
            template.format(type_v=type_v, context=context, query=query),
            prefix.format(type_v=type_v, query=query),
            answers,
        )

    return make


def _singular(text: str) -> str:
    return (
        text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    )


def _vt_chains(
    rng: random.Random, chains: int, hops: int, letters: int
) -> tuple[list[list[str]], list[list[str]]]:
    names: list[str] = []
    while len(names) < (hops + 1) * chains:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    variables, lines = [], []
    for c in range(chains):
        these = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        variables.append(these)
        chain = [f"VAR {these[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(hops)]
        lines.append(chain)
    return variables, lines


def _vt_context(rng: random.Random, n: int, chains: list[list[str]]) -> str:
    sentences = [NOISE] * n
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    return "\n".join(sentences).replace(". \n", ".\n")


def _vt_maker(spec: dict[str, Any], seed: str, length: int) -> Callable[[int], Made]:
    hops, chains = spec["hops"], spec["chains"]
    icl_rng = random.Random(seed + ":icl")
    icl_vars, icl_chains = _vt_chains(icl_rng, chains, min(hops, 10), letters=3)
    icl_value = icl_chains[0][0].split("=")[-1].strip()
    icl_context = _vt_context(icl_rng, max(hops + 1, min(20, length // 200)), icl_chains)
    example = (
        VT_TEMPLATE.format(context=icl_context, query=icl_value)
        + VT_PREFIX.format(num_v=hops + 1, query=icl_value)
        + " "
        + " ".join(icl_vars[0])
        + "\n"
    )

    def make(n: int) -> Made:
        rng = random.Random(seed)
        variables, lines = _vt_chains(rng, chains, hops, letters=5)
        value = lines[0][0].split("=")[-1].strip()
        context = _vt_context(rng, n, lines)
        text = example + "\n" + VT_TEMPLATE.format(context=context, query=value)
        return text, VT_PREFIX.format(num_v=hops + 1, query=value), list(variables[0])

    return make


def _cwe_list(rng: random.Random, words: list[str], n: int, common_reps: int, rare_reps: int, n_common: int):
    if n > len(words):  # more words than wonderwords has: add adjective-noun compounds
        nouns, adjs, _ = _wonderwords()
        extra = sorted({f"{a}-{b}" for a in adjs[:200] for b in nouns[: -(-n // 200) + 1]})
        words = words + extra
    chosen = rng.sample(words, n)
    common, rare = chosen[:n_common], chosen[n_common:]
    listed = common * common_reps + rare * rare_reps
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe_maker(spec: dict[str, Any], seed: str, length: int) -> Callable[[int], Made]:
    words = _cwe_words()
    n_common = spec["num_cw"]

    def make(n: int) -> Made:
        rng = random.Random(seed)
        if length < 4096:  # RULER's short-context setting: fewer repeats, smaller example
            ex_context, ex_answer = _cwe_list(rng, words, 20, 3, 1, n_common)
            context, answer = _cwe_list(rng, words, n, 6, 1, n_common)
        else:
            ex_context, ex_answer = _cwe_list(rng, words, 40, 10, 3, n_common)
            context, answer = _cwe_list(rng, words, n, spec["freq_cw"], spec["freq_ucw"], n_common)
        example = (
            CWE_TEMPLATE.format(context=ex_context)
            + CWE_PREFIX
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
        )
        return example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer

    return make


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1: partial sum plus the Euler-Maclaurin tail."""
    partial = math.fsum(k**-alpha for k in range(1, terms + 1))
    return partial + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms**-alpha


def _fwe_maker(spec: dict[str, Any], seed: str, length: int) -> Callable[[int], Made]:
    alpha, wordlen = spec["alpha"], spec["coded_wordlen"]
    vocab_size = max(length // 50, 10)
    rng0 = random.Random(seed)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng0.choices(string.ascii_lowercase, k=wordlen)))
    ordered = sorted(vocab)
    rng0.shuffle(ordered)
    ordered[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = _zeta(alpha)

    def make(n: int) -> Made:
        rng = random.Random(seed + ":text")
        counts = [int(n * (k**-alpha) / zeta) for k in range(1, len(ordered) + 1)]
        words = [w for w, c in zip(ordered, counts, strict=True) for _ in range(c)]
        rng.shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, ordered[1:4]

    return make


# -- fitting to a token length --------------------------------------------------------------------
def split_sample(
    sample: RulerSample, tokenizer: Any, chat: bool | None = None
) -> tuple[list[int], list[int]]:
    """The query-agnostic form of ``sample`` (kvpress's protocol): the context's token ids (the task's
    instructions and haystack) and the question's (the template's last line, then the answer prefix).

    Every RULER template puts its question on the line after the haystack; here the two parts are
    joined by :data:`~kvpolicy.generation.QUESTION_SEPARATOR` (a blank line) and tokenized apart, as
    :func:`~kvpolicy.generation.encode_context_questions` does, so the pair is a token or two longer
    than ``sample.input_ids``."""
    from kvpolicy.generation import encode_context_questions

    head, sep, question = sample.prompt.rpartition("\n")
    if not sep:
        raise ValueError(f"RULER {sample.task} prompt has no question line to split off")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        context_ids, asked = encode_context_questions(
            tokenizer, head, [question + sample.answer_prefix], False
        )
        return context_ids, asked[0]
    context_ids, asked = encode_context_questions(tokenizer, head, [question], True)
    # The answer prefix opens the assistant turn, as in the query-aware prompt (_encode).
    prefix = tokenizer(sample.answer_prefix.lstrip(" "), add_special_tokens=False)["input_ids"]
    return context_ids, asked[0] + list(prefix)


def _encode(tokenizer: Any, text: str, prefix: str, chat: bool | None) -> list[int]:
    from kvpolicy.generation import encode_prompt

    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        return encode_prompt(tokenizer, text + prefix, chat=False)
    # The answer prefix opens the assistant turn, as RULER appends it after the model's template.
    return encode_prompt(tokenizer, text, chat=True) + list(
        tokenizer(prefix.lstrip(" "), add_special_tokens=False)["input_ids"]
    )


def _fit(measure: Callable[[int], int], length: int, lowest: int, start: int) -> int:
    """Largest n >= ``lowest`` with ``measure(n) <= length`` (exponential then binary search)."""
    if measure(lowest) > length:
        raise ValueError(
            f"length {length} is too short for this task (its smallest prompt has {measure(lowest)} tokens)"
        )
    lo, hi = lowest, max(start, lowest + 1)
    while measure(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) <= length:
            lo = mid
        else:
            hi = mid
    return lo


def generate_sample(
    task: str,
    tokenizer: Any,
    length: int,
    index: int = 0,
    seed: int = 42,
    essay: str | None = None,
    chat: bool | None = None,
) -> RulerSample:
    """Sample ``index`` of ``task`` at ``length`` prompt tokens; the same arguments give the same sample.

    ``essay`` is the haystack text for the essay tasks (default: the Paul Graham essays).
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    key = f"ruler:{seed}:{task}:{length}:{index}"
    if spec["kind"] == "niah":
        words = None
        if spec["haystack"] == "essay":
            if essay is None:
                from kvpolicy.eval import needle

                essay = needle.load_haystack(needle.find_haystack_dir())
            words = _essay_words(essay)
        make = _niah_maker(spec, key, words)
        lowest, start = max(spec["k"] * spec["v"], 1), 64
    elif spec["kind"] == "vt":
        make = _vt_maker(spec, key, length)
        lowest, start = spec["hops"] + 1, 32
    elif spec["kind"] == "cwe":
        make = _cwe_maker(spec, key, length)
        lowest, start = spec["num_cw"] + 1, 64
    else:
        make = _fwe_maker(spec, key, length)
        # enough words that the 4th most frequent one (the last answer) occurs at least once
        lowest, start = math.ceil(4 ** spec["alpha"] * _zeta(spec["alpha"])), 64

    cache: dict[int, tuple[list[int], Made]] = {}

    def built(n: int) -> tuple[list[int], Made]:
        if n not in cache:
            made = make(n)
            cache[n] = (_encode(tokenizer, made[0], made[1], chat), made)
        return cache[n]

    n = _fit(lambda m: len(built(m)[0]), length, lowest, start)
    ids, (text, prefix, outputs) = built(n)
    return RulerSample(task, length, index, ids, text, prefix, list(outputs), n)
