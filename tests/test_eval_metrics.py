"""Benchmark scores against hand-checked examples, including the official scorers' quirks."""

from __future__ import annotations

import pytest

from kvpolicy.eval import longbench, metrics
from kvpolicy.eval.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    longbench_bucket,
    longbench_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    string_match_all,
    string_match_part,
)
from kvpolicy.eval.needle import NEEDLE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an Apple, a pear; THE plum!", "apple pear plum"),  # articles in any case, punctuation
        ("  lots   of\tspace\n", "lots of space"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so no article is left to strip
        ("U.S.A.", "usa"),
        ("don't", "dont"),
        ("“smart” quotes", "“smart” quotes"),  # only ASCII punctuation, as in the official code
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1_hand_checked():
    # pred {eiffel, tower}, reference {eiffel, tower, paris}: P = 1, R = 2/3, F1 = 0.8
    assert qa_f1_score("The Eiffel Tower.", "Eiffel Tower, Paris") == pytest.approx(0.8)
    assert qa_f1_score("Paris", "paris") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0
    # repeated tokens count once per occurrence: common 1, P = 1/2, R = 1 -> 2/3
    assert qa_f1_score("paris paris", "Paris") == pytest.approx(2 / 3)
    assert qa_f1_score("the", "a") == 0.0  # both normalise to nothing


def test_rouge_l_hand_checked():
    # rouge's summary-level LCS counts distinct words ("exclusive"): reference {the, cat, is, on, mat},
    # prediction {the, cat, sat, on, mat}, union LCS {the, cat, on, mat}: P = R = 4/5
    assert rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_l_score("identical words here", "identical words here") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l_score("", "a reference") == 0.0  # empty hypothesis: 0, as the official try/except
    assert rouge_l_score("nothing shared", "other text") == 0.0


def test_classification_score_and_its_quirks():
    classes = ["Location", "City", "Country"]
    assert classification_score("City", "City", all_classes=classes) == 1.0
    assert classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert classification_score("Location", "City", all_classes=classes) == 0.0
    assert classification_score("no idea", "City", all_classes=classes) == 0.0  # no difflib fallback
    # "a" is a strict substring of the reference and is dropped; the official loop then skips "b"
    # (removal shifts the list under the iterator), so two matches remain: 1/2.
    assert classification_score("ab", "ab", all_classes=["a", "b", "ab"]) == 0.5


def test_count_and_retrieval():
    assert count_score("There are 5 unique paragraphs, not 3.", "5") == 0.5
    assert count_score("five", "5") == 0.0
    assert count_score("5", 5) == 1.0
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_score("Paragraph 120", "Paragraph 12") == 0.0
    with pytest.raises(ValueError, match="Paragraph"):
        retrieval_score("1", "the first one")


def test_code_similarity():
    # the first line without a code fence, '#' or '//' is compared
    assert code_sim_score("```python\nx = foo(1)\n```", "x = foo(1)") == 1.0
    # Indel ratio of "return a+b" (10) vs "return a + b" (12): 2 * 10 / 22 = 90.9 -> 91 %
    assert code_sim_score("# add\nreturn a+b", "return a + b") == 0.91
    assert code_sim_score("// only comments", "x") == 0.0


def test_longbench_score_first_line_and_best_answer():
    assert longbench_score("triviaqa", "\nParis\nLondon is not it", ["Paris"]) == 100.0
    assert longbench_score("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(100 * 2 / 3)
    assert longbench_score("hotpotqa", "Paris", ["London", "Paris", "Rome"]) == 100.0
    assert longbench_score("trec", "Type: City", ["City"], ["City", "Country"]) == 100.0
    assert set(metrics.LONGBENCH_METRICS) == set(longbench.TASKS_EN)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench_score("dureader", "x", ["x"])


def test_longbench_buckets():
    assert [longbench_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == [
        "0-4k",
        "0-4k",
        "4-8k",
        "4-8k",
        "8k+",
        "8k+",
    ]


def test_ruler_string_match():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 100.0
    assert string_match_all("", ["x"]) == 0.0
    assert string_match_part("it is 456", ["123", "456"]) == 100.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_needle_scores():
    answer = "Eat a sandwich and sit in Dolores Park on a sunny day."
    assert metrics.needle_found(answer)
    assert metrics.needle_recall(NEEDLE) == 1.0
    assert metrics.needle_recall(answer) == pytest.approx(11 / 19)  # 11 of the needle's 19 distinct words
    assert metrics.needle_recall("nothing relevant") < 0.2
