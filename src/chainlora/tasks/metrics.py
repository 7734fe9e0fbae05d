"""Metrics as the MeZO harness computes them: accuracy, and SQuAD token F1 / exact match (max over golds).

SQuAD normalisation: lower-case → remove punctuation → drop the words a/an/the → collapse whitespace. As in the
harness (and unlike the official SQuAD v2 script), an answer that normalises to nothing scores F1 0, and when
the *first* gold answer is an unanswerable marker (``no answer`` or ``CANNOTANSWER``) F1 is exact match
against that marker (the harness's ``f1`` rule).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lower, strip punctuation, drop articles, collapse whitespace)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token-level F1 between one prediction and one gold answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


NO_ANSWER_MARKERS = ("no answer", "CANNOTANSWER")


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Max token F1 over the gold answers; exact match against the marker when the first gold answer says
    the question has no answer (``NO_ANSWER_MARKERS``), as the harness."""
    if not golds:
        raise ValueError("squad_f1 needs at least one gold answer")
    if golds[0] in NO_ANSWER_MARKERS:
        return float(normalize_answer(golds[0]) == normalize_answer(prediction))
    return max(token_f1(prediction, gold) for gold in golds)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the prediction equals any gold answer after normalisation, else 0.0."""
    if not golds:
        raise ValueError("exact_match needs at least one gold answer")
    return float(any(normalize_answer(prediction) == normalize_answer(gold) for gold in golds))


def accuracy(predicted: Sequence[int], gold_indices: Sequence[Sequence[int]]) -> float:
    """Share of predictions that are one of their example's correct candidates (ReCoRD: any gold entity)."""
    if len(predicted) != len(gold_indices):
        raise ValueError(f"{len(predicted)} predictions for {len(gold_indices)} examples")
    if not predicted:
        raise ValueError("accuracy of no predictions")
    return sum(p in golds for p, golds in zip(predicted, gold_indices, strict=True)) / len(predicted)
