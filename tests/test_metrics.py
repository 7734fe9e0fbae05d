"""SQuAD F1 / EM and accuracy against hand-computed values on tricky strings."""

from __future__ import annotations

import pytest

from chainlora.tasks import accuracy, exact_match, normalize_answer, squad_f1, token_f1


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an   apple, a pear  ", "apple pear"),
        ("theatre", "theatre"),  # articles only as whole words
        ("A.B.C.", "abc"),  # punctuation removed before articles are looked for
        ("rock-n-roll", "rocknroll"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1_by_hand():
    # prediction tokens: denver broncos team; gold: denver broncos -> P = 2/3, R = 1, F1 = 0.8
    assert token_f1("the Denver Broncos team", "Denver Broncos.") == pytest.approx(0.8)
    # repeated tokens count by multiplicity: pred [a1 a1 b], gold [a1 b b] -> overlap 2, P = R = 2/3
    assert token_f1("a1 a1 b", "a1 b b") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0


def test_answers_that_normalize_to_nothing_score_zero_as_in_the_harness():
    assert token_f1("the", "The") == 0.0
    assert exact_match("the", ["The"]) == 1.0  # EM compares normalized strings: "" == ""


def test_max_over_gold_answers():
    golds = ["Saint Bernadette Soubirous", "Bernadette", "a girl named Bernadette Soubirous"]
    # vs gold 2: P = 1/2, R = 1 -> 2/3; vs gold 1: P = R = 2/2... pred [bernadette soubirous]
    # gold 1 tokens [saint bernadette soubirous]: P = 1, R = 2/3 -> 0.8; gold 3 [girl named bernadette soubirous]:
    # P = 1, R = 1/2 -> 2/3. Max = 0.8.
    assert squad_f1("Bernadette Soubirous.", golds) == pytest.approx(0.8)
    assert exact_match("bernadette", golds) == 1.0
    assert exact_match("Soubirous", golds) == 0.0


def test_accuracy_counts_any_gold_candidate():
    assert accuracy([0, 2, 1], [(0,), (1, 2), (0,)]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([0], [(0,), (1,)])


def test_empty_golds_are_rejected():
    with pytest.raises(ValueError):
        squad_f1("x", [])


def test_f1_against_a_no_answer_marker_is_exact_match_as_in_the_harness():
    # token F1 would give partial credit ("no" overlaps); the harness scores EM against the marker instead
    assert squad_f1("no answer here", ["no answer", "x"]) == 0.0
    assert squad_f1("No answer.", ["no answer"]) == 1.0
    assert squad_f1("cannotanswer", ["CANNOTANSWER"]) == 1.0
    assert squad_f1("x", ["CANNOTANSWER", "x"]) == 0.0  # only the first gold decides, as the harness
    assert squad_f1("x y", ["x", "no answer"]) == pytest.approx(2 / 3)  # marker not first: plain F1
