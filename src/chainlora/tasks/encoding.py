"""Tokenizing examples the way the MeZO harness does; shared by scoring, generation and training.

- The whole string is tokenized with the tokenizer's own special tokens (``chainlora.models.prepare_tokenizer``
  makes tokenizers add exactly one BOS where the model expects it).
- A candidate's option length is ``len(tokens(full string)) - len(tokens(prompt))``, from untruncated encodings;
  the option is the *last* that many tokens of the full encoding, even where BPE merges across the prompt
  boundary (then the prompt's tokens are not a prefix of the full string's).
- Inputs longer than ``max_length`` are left-truncated, keeping the BOS when the tokenizer adds one.

Two guards the harness lacks (both no-ops on every real example seen): an option length below 1 is raised to
1 (the harness would score the whole sequence), and one that would reach the first token after truncation is
cut so that every option token has a preceding token to predict it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from chainlora.tasks.base import Example

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_NEW_TOKENS = 50


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of every candidate's full string (truncated) and its option length.

    Invariant: ``1 <= option_lengths[i] < len(sequences[i])``; the option tokens are ``sequences[i][-L:]``.
    """

    sequences: tuple[tuple[int, ...], ...]
    option_lengths: tuple[int, ...]


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding a string prepends the BOS token (then truncation keeps it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def newline_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a generated answer: the *last* token of "\\n" encoded alone, as the harness
    (``tokenizer.encode("\\n", add_special_tokens=False)[-1]``): one token for OPT/GPT-2 BPE, and it skips the
    leading "▁" that SentencePiece (Llama) puts before "<0x0A>"."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the tokenizer encodes '\\n' to nothing; cannot stop generation at a newline")
    return ids[-1]


def truncate_left(ids: Sequence[int], max_length: int, keep_first: bool) -> tuple[int, ...]:
    """The last ``max_length`` tokens; with ``keep_first`` the first (BOS) token plus the last ``max_length-1``."""
    if len(ids) <= max_length:
        return tuple(ids)
    if keep_first:
        return (ids[0], *ids[len(ids) - (max_length - 1) :])
    return tuple(ids[len(ids) - max_length :])


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_length: int = DEFAULT_MAX_LENGTH
) -> list[EncodedExample]:
    """Encode every candidate of every example (one batched tokenizer call), with option lengths."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not examples:
        return []
    keep_bos = tokenizer_adds_bos(tokenizer)
    texts = [example.prompt for example in examples]
    texts += [candidate for example in examples for candidate in example.candidates]
    ids = tokenizer(texts)["input_ids"]
    prompt_ids, candidate_ids = ids[: len(examples)], iter(ids[len(examples) :])
    encoded = []
    for example, prompt in zip(examples, prompt_ids, strict=True):
        sequences, option_lengths = [], []
        for _ in example.candidates:
            full = next(candidate_ids)
            sequence = truncate_left(full, max_length, keep_bos)
            option_length = min(max(len(full) - len(prompt), 1), len(sequence) - 1)
            if option_length < 1:
                raise ValueError(
                    f"a candidate of example {example.source_index} encodes to fewer than 2 tokens"
                )
            sequences.append(sequence)
            option_lengths.append(option_length)
        encoded.append(EncodedExample(tuple(sequences), tuple(option_lengths)))
    return encoded


def encode_prompts(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[tuple[int, ...]]:
    """Generation inputs: each prompt, left-truncated to ``max_length - max_new_tokens`` (BOS kept)."""
    limit = max_length - max_new_tokens
    if limit < 2:
        raise ValueError(f"max_length - max_new_tokens must be at least 2, got {limit}")
    if not examples:
        return []
    keep_bos = tokenizer_adds_bos(tokenizer)
    ids = tokenizer([example.prompt for example in examples])["input_ids"]
    return [truncate_left(prompt, limit, keep_bos) for prompt in ids]
