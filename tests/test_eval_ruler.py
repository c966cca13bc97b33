"""RULER generator: deterministic per seed, every sample holds its answer, filled to the length asked."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from kvpolicy.eval import ruler
from kvpolicy.eval.tasks import RulerTask


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvpolicy.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_sample_is_deterministic_and_holds_its_answer(task, tokenizer):
    a = ruler.generate_sample(task, tokenizer, 1024, index=0, seed=7)
    b = ruler.generate_sample(task, tokenizer, 1024, index=0, seed=7)
    assert a == b
    other = ruler.generate_sample(task, tokenizer, 1024, index=0, seed=8)
    assert other.input_ids != a.input_ids and other.outputs != a.outputs
    assert ruler.generate_sample(task, tokenizer, 1024, index=1, seed=7).outputs != a.outputs
    # filled to the length with the model's tokenizer: at most the length, and close to it
    assert 0.85 * 1024 <= len(a.input_ids) <= 1024
    text = tokenizer.decode(a.input_ids)
    assert a.outputs and all(answer in a.prompt and answer in text for answer in a.outputs)
    assert text.rstrip().endswith(a.answer_prefix.strip())  # the answer prefix opens the reply


def test_niah_structure(tokenizer):
    s = ruler.generate_sample("niah_single_1", tokenizer, 1024, seed=1)
    assert s.prompt.startswith("A special magic number is hidden")  # singular rewrite
    assert ruler.NOISE in s.prompt
    (needle,) = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.prompt)
    assert needle[1] == s.outputs[0] and len(needle[1]) == 7
    assert f"for {needle[0]} mentioned" in s.answer_prefix

    multi = ruler.generate_sample("niah_multikey_2", tokenizer, 1024, seed=1)
    pairs = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multi.prompt)
    asked = re.search(r"for (\S+) mentioned", multi.answer_prefix).group(1)
    assert len(pairs) > 10  # the haystack is distractor needles
    assert [v for k, v in pairs if k == asked] == multi.outputs  # the queried key appears once

    uuids = ruler.generate_sample("niah_multikey_3", tokenizer, 1024, seed=1)
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids.outputs[0]
    )

    mv = ruler.generate_sample("niah_multivalue", tokenizer, 1024, seed=1)
    assert len(mv.outputs) == 4 and "Some special magic numbers" in mv.prompt
    mq = ruler.generate_sample("niah_multiquery", tokenizer, 1024, seed=1)
    assert len(mq.outputs) == 4 and mq.answer_prefix.count(", ") >= 3


def test_vt_chain(tokenizer):
    s = ruler.generate_sample("vt", tokenizer, 1024, seed=3)
    names = s.outputs
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d+)", s.prompt).group(1)
    for prev, nxt in itertools.pairwise(names):
        assert f"VAR {nxt} = VAR {prev}" in s.prompt
    assert f"assigned the value {value}, they are:" in s.answer_prefix
    # one worked example with 3-letter variables comes first
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n", s.prompt)


def test_cwe_and_fwe_frequencies(tokenizer):
    cwe = ruler.generate_sample("cwe", tokenizer, 1024, seed=2)
    listed = re.findall(r"\d+\. (\S+)", cwe.prompt.split("\n", 3)[-1])
    counts = {w: listed.count(w) for w in set(listed)}
    assert set(sorted(counts, key=counts.get, reverse=True)[:10]) == set(cwe.outputs)
    assert min(counts[w] for w in cwe.outputs) > max(c for w, c in counts.items() if w not in cwe.outputs)

    fwe = ruler.generate_sample("fwe", tokenizer, 1024, seed=2)
    words = fwe.prompt.split("coded words. ", 1)[1].split("\nQuestion")[0].split()
    ranked = sorted(set(words) - {"..."}, key=words.count, reverse=True)
    assert ranked[:3] == fwe.outputs
    assert ruler._zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-9)


def test_too_short_length_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        ruler.generate_sample("vt", tokenizer, 128)
    task = RulerTask(lengths=[128], tasks=["niah_single_1", "vt"], samples=1)

    class _Model:
        class config:  # stands in for a model config
            max_position_embeddings = 4096

    with pytest.raises(ValueError, match="vt at 128"):
        task.prepare(_Model(), tokenizer)
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerTask(tasks=["qa_1"])


def test_items_are_stable():
    task = RulerTask(lengths=[512, 1024], tasks=["niah_single_1", "fwe"], samples=2)
    ids = [i.id for i in task.items()]
    assert len(ids) == len(set(ids)) == 8
    assert ids == [
        i.id for i in RulerTask(lengths=[512, 1024], tasks=["niah_single_1", "fwe"], samples=2).items()
    ]
    assert task.new_tokens("niah_single_1") == 64 and task.new_tokens("vt") == 30
