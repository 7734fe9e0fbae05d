"""Records → token ids and labels (``-100`` on every token that is not trained), fitted to ``max_length``.

- ``text``: the text with the tokenizer's special tokens, then EOS; every token trained.
- ``prompt_completion``: ``tokens(prompt)`` (with the tokenizer's BOS, if it adds one) followed by
  ``tokens(completion)`` and EOS, tokenized apart as TRL does, so the prompt is exactly what generation will
  see; the completion and EOS are trained.
- ``messages``: the chat template's tokens (``chainlora.data.chat``); trained assistant turns only.

Too long (over ``max_length``): the untrained side is cut from the left, keeping the first token when it is
BOS, so the last trained span (the completion, the last assistant turn) survives whole; an example whose last
trained span alone does not fit is dropped; ``text`` keeps its first ``max_length`` tokens. How many were cut
and dropped is counted (``EncodeStats``) and recorded in ``metrics.json``. Every kept example has at least
one trained token; a row whose trained part renders to no token at all is a ``DataError`` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase

from chainlora.data.chat import render_conversation
from chainlora.data.formats import Record
from chainlora.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    """One training example: ``labels[i]`` is ``input_ids[i]`` where token i is trained, else ``-100``."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    row: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """What fitting a split to ``max_length`` did."""

    examples: int = 0  # kept
    cut: int = 0  # shortened from the left (prompt side) or, for text, from the right
    dropped: int = 0  # their last trained span alone is longer than max_length
    tokens: int = 0
    trained_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> int:
    """1 when the tokenizer starts every encoding with BOS (that token is kept by left truncation), else 0."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return 0
    ids = tokenizer("a")["input_ids"]
    return int(len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and ids[0] == bos)


def encode_record(
    record: Record, fmt: str, tokenizer: PreTrainedTokenizerBase, template: str | None
) -> tuple[list[int], list[bool]]:
    """Untruncated token ids of one record and, per token, whether it is trained."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = list(tokenizer(record.text)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, [True] * len(ids)
    if fmt == "prompt_completion":
        prompt = list(tokenizer(record.prompt)["input_ids"])
        completion = list(tokenizer(record.completion, add_special_tokens=False)["input_ids"])
        if eos is not None:
            completion.append(eos)
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if fmt == "messages":
        assert record.conversation is not None and template is not None
        return render_conversation(
            tokenizer, record.conversation.messages, record.conversation.trained, template
        )
    raise ValueError(f"format {fmt!r} is not encoded token by token")


def fit_to_length(
    ids: list[int], trained: list[bool], max_length: int, keep_first: int, *, cut_right: bool
) -> tuple[list[int], list[bool]] | None:
    """``ids`` fitted to ``max_length`` (see the module docstring), or None when it must be dropped."""
    if len(ids) <= max_length:
        return ids, trained
    if cut_right:
        return ids[:max_length], trained[:max_length]
    last_span_start = len(trained)
    while last_span_start > 0 and not trained[last_span_start - 1]:
        last_span_start -= 1  # skip untrained tokens after the last trained span
    while last_span_start > 0 and trained[last_span_start - 1]:
        last_span_start -= 1
    overflow = len(ids) - max_length
    if overflow > last_span_start - keep_first:
        return None
    start = keep_first + overflow
    return ids[:keep_first] + ids[start:], trained[:keep_first] + trained[start:]


def encode_records(
    records: Sequence[Record],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    template: str | None = None,
    where: str = "data",
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode and fit every record; ``DataError`` (naming the row) for one with no trained token, or when
    every example had to be dropped."""
    keep_first = bos_prefix(tokenizer) if fmt != "messages" else 0
    if fmt == "messages" and tokenizer.bos_token_id is not None:
        keep_first = -1  # decided per example: the template may or may not start with BOS
    stats = EncodeStats()
    encoded = []
    for record in records:
        ids, trained = encode_record(record, fmt, tokenizer, template)
        if not any(trained):
            raise DataError(f"{where}: row {record.row}: no token left to train on after tokenizing it")
        first = keep_first if keep_first >= 0 else int(bool(ids) and ids[0] == tokenizer.bos_token_id)
        fitted = fit_to_length(ids, trained, max_length, first, cut_right=fmt == "text")
        if fitted is None:
            stats.dropped += 1
            continue
        if len(fitted[0]) < len(ids):
            stats.cut += 1
        ids, trained = fitted
        labels = tuple(token if learn else IGNORE_INDEX for token, learn in zip(ids, trained, strict=True))
        encoded.append(EncodedExample(tuple(ids), labels, record.row))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(trained)
    if records and not encoded:
        raise DataError(
            f"{where}: every example's answer is longer than max_length {max_length} tokens: raise max_length"
        )
    return encoded, stats
