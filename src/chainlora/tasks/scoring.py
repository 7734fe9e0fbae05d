"""Candidate scoring (mean log-prob of the option tokens), greedy generation, and task evaluation.

``score_candidates`` gives the harness's numbers (``score_candidates_naive``: one forward per candidate) at a
fraction of the cost:

1. The candidates of an example share a token prefix (at least the prompt, up to where BPE merges across the
   prompt boundary, and up to where their encodings first differ). That prefix is run **once** per example,
   batched across length-sorted examples with left padding (batches cut where the padding would cost more than
   another forward: ``length_batches``), and its key/value cache is kept when a candidate needs it.
2. Each candidate's remaining tokens are run on a copy of the cache selected for it (left-padded, explicit
   position ids), in chunks of ``batch_size`` rows. A candidate whose option is a single token right after
   the shared prefix (every Yes/No verbalizer) needs no second pass at all.

Every option token is scored from exactly the context the naive pass gives it, so both agree to float
round-off (tested ≤ 1e-5 in fp32 and ≤ 1e-9 in fp64, where neither path rounds the logits to fp32). An example
whose candidates share no token (no BOS, different first tokens) falls back to the naive pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chainlora.errors import ConfigError
from chainlora.tasks.base import Example, Task
from chainlora.tasks.encoding import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_NEW_TOKENS,
    EncodedExample,
    encode_examples,
    encode_prompts,
    newline_token_id,
)
from chainlora.tasks.metrics import accuracy, exact_match, squad_f1

FORWARD_COST = {"cpu": 48.0}
"""Fixed cost of one forward in tokens' worth of work, per device type: splits prefix batches whose padding costs
more (``score_candidates``). CPU: a small batch streams every weight once (SmolLM2-135M, 1 thread: a forward of
8 tokens costs as much as ~50 tokens of a long one); elsewhere not measured, so batches stay full."""


def default_forward_cost(device: str | torch.device) -> float:
    """``FORWARD_COST`` of ``device``'s type; infinite (full prefix batches) where it was not measured."""
    return FORWARD_COST.get(torch.device(device).type, math.inf)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_pad(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]], **kwargs: Any
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``rows``, left-padded by the tokenizer itself."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            "the tokenizer has no pad token: prepare it with chainlora.models.prepare_tokenizer"
        )
    batch = tokenizer.pad(
        {"input_ids": [list(row) for row in rows]},
        padding=True,
        padding_side="left",
        return_tensors="pt",
        **kwargs,
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in at least fp32 (bf16/fp16 are upcast, fp32 is returned as is, fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def position_ids_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions of the real tokens counted from ``offset`` (left padding does not shift them; pads get 0)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if isinstance(offset, torch.Tensor):
        offset = offset.view(-1, 1)
    return (positions + offset) * attention_mask.long()


# ---- reference: the harness, one forward per candidate -------------------------------------------------------


@torch.inference_mode()
def score_candidates_naive(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[list[float]]:
    """Mean log-prob of each candidate's option tokens, one unpadded forward per candidate (the harness)."""
    return [
        _naive_scores(model, encoded)
        for encoded in encode_examples(examples, tokenizer, max_length=max_length)
    ]


def _naive_scores(model: PreTrainedModel, encoded: EncodedExample) -> list[float]:
    device = model_device(model)
    scores = []
    for sequence, option_length in zip(encoded.sequences, encoded.option_lengths, strict=True):
        input_ids = torch.tensor([sequence], device=device)
        logits = upcast(model(input_ids=input_ids).logits[0, :-1])
        token_log_probs = logits.log_softmax(-1).gather(-1, input_ids[0, 1:, None])[:, 0]
        scores.append(token_log_probs[-option_length:].mean().item())
    return scores


# ---- fast path: shared prefix once, candidates on its cache ----------------------------------------------------


@torch.inference_mode()
def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    forward_cost: float | None = None,
) -> list[list[float]]:
    """Mean log-prob of each candidate's option tokens (the harness's score), fast (see the module docstring).

    ``batch_size`` bounds both the examples whose prefixes run together and the candidate rows per forward.
    Prefix batches are runs of length-sorted examples cut where the pad tokens saved outweigh one more forward
    of fixed cost ``forward_cost`` tokens (``length_batches``); None: ``FORWARD_COST`` of the model's device
    (infinite, i.e. always full batches, where it has not been measured).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if forward_cost is not None and not forward_cost >= 0:
        raise ValueError(f"forward_cost must be >= 0, got {forward_cost}")
    encoded = encode_examples(examples, tokenizer, max_length=max_length)
    plans = [_PrefixPlan.of(item) for item in encoded]
    scores: list[list[float]] = [[] for _ in encoded]
    for i, plan in enumerate(plans):
        if plan.prefix_length == 0:
            scores[i] = _naive_scores(model, encoded[i])
    shared = sorted(
        (i for i, plan in enumerate(plans) if plan.prefix_length > 0), key=lambda i: -plans[i].prefix_length
    )
    if forward_cost is None:
        forward_cost = default_forward_cost(model_device(model))
    lengths = [plans[i].prefix_length for i in shared]
    for positions in length_batches(lengths, batch_size, forward_cost):
        chosen = [shared[k] for k in positions]
        for i, result in zip(
            chosen, _score_batch(model, tokenizer, [plans[i] for i in chosen], batch_size), strict=True
        ):
            scores[i] = result
    return scores


def length_batches(lengths: Sequence[int], batch_size: int, forward_cost: float) -> list[range]:
    """Cut positions ``0..n-1`` of ``lengths`` (sorted longest first) into consecutive batches of at most
    ``batch_size``, minimising ``Σ forward_cost + rows × longest``: the padded tokens of every left-padded
    forward plus a fixed cost per forward, in tokens (dynamic programming, O(n × batch_size)). With an infinite
    ``forward_cost`` the batches are simply the consecutive ``batch_size``-runs."""
    n = len(lengths)
    if math.isinf(forward_cost):
        return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cover of the first j
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):  # batch i..j-1, padded to lengths[i]
            cost = best[i] + forward_cost + (j - i) * lengths[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches = []
    while n > 0:
        batches.append(range(cut[n], n))
        n = cut[n]
    return batches[::-1]


class _PrefixPlan:
    """How one example splits: a shared prefix ``K`` and, per candidate, which option tokens each pass scores.

    Option token t (``n - L <= t < n``) is predicted by position t - 1: from the prefix pass if t <= K
    (``from_prefix`` of them, the first ones), else from the candidate pass (``from_rest``, the last ones).
    """

    def __init__(self, encoded: EncodedExample, prefix_length: int) -> None:
        self.encoded = encoded
        self.prefix_length = prefix_length
        self.longest = max(len(s) for s in encoded.sequences)
        self.from_prefix = [
            max(0, prefix_length - (len(s) - length) + 1)
            for s, length in zip(encoded.sequences, encoded.option_lengths, strict=True)
        ]
        self.from_rest = [
            length - k for length, k in zip(encoded.option_lengths, self.from_prefix, strict=True)
        ]

    @classmethod
    def of(cls, encoded: EncodedExample) -> _PrefixPlan:
        """Shared prefix = longest common token prefix, leaving every candidate at least one token of its own."""
        sequences = encoded.sequences
        first = np.asarray(sequences[0])
        shared = min(len(s) for s in sequences) - 1
        for other in sequences[1:]:
            differs = np.flatnonzero(first[:shared] != np.asarray(other[:shared]))
            shared = int(differs[0]) if differs.size else shared
        return cls(encoded, shared)

    def prefix_positions_needed(self) -> int:
        """How many of the prefix's last positions predict an option token (at least 1)."""
        earliest = [
            len(s) - length - 1
            for s, length, k in zip(
                self.encoded.sequences, self.encoded.option_lengths, self.from_prefix, strict=True
            )
            if k > 0
        ]
        return self.prefix_length - min(earliest) if earliest else 1


def _score_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plans: list[_PrefixPlan], batch_size: int
) -> list[list[float]]:
    device = model_device(model)
    prefix = left_pad(tokenizer, [plan.encoded.sequences[0][: plan.prefix_length] for plan in plans])
    prefix = {key: value.to(device) for key, value in prefix.items()}
    kept = max(plan.prefix_positions_needed() for plan in plans)
    # Candidates with option tokens past the prefix, longest rest first (less padding in their chunks).
    pending = sorted(
        ((b, c) for b, plan in enumerate(plans) for c, rest in enumerate(plan.from_rest) if rest > 0),
        key=lambda bc: plans[bc[0]].prefix_length - len(plans[bc[0]].encoded.sequences[bc[1]]),
    )
    out = model(
        **prefix,
        position_ids=position_ids_from_mask(prefix["attention_mask"]),
        use_cache=bool(pending),  # no cache to build when every option token is predicted by the prefix
        logits_to_keep=kept,
    )
    prefix_log_probs = upcast(out.logits).log_softmax(-1)  # (B, kept, V): last `kept` prefix positions
    cache = out.past_key_values

    sums = [[0.0] * len(plan.encoded.sequences) for plan in plans]
    # Option tokens predicted by the prefix's last positions: prefix position p sits at kept index kept - K + p.
    rows, columns, tokens, owners = [], [], [], []
    for b, plan in enumerate(plans):
        for c, (sequence, length) in enumerate(
            zip(plan.encoded.sequences, plan.encoded.option_lengths, strict=True)
        ):
            for t in range(len(sequence) - length, len(sequence) - length + plan.from_prefix[c]):
                rows.append(b)
                columns.append(kept - plan.prefix_length + t - 1)
                tokens.append(sequence[t])
                owners.append((b, c))
    if rows:
        index = torch.tensor([rows, columns, tokens], device=device)
        picked = prefix_log_probs[index[0], index[1], index[2]].tolist()
        for (b, c), value in zip(owners, picked, strict=True):
            sums[b][c] += value

    # Candidates with option tokens past the prefix: run their own tokens (all but the last) on the cache.
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        inputs = [plans[b].encoded.sequences[c][plans[b].prefix_length : -1] for b, c in chunk]
        rest = left_pad(tokenizer, inputs)
        rest = {key: value.to(device) for key, value in rest.items()}
        owners_rows = torch.tensor([b for b, _ in chunk], device=device)
        offsets = torch.tensor([plans[b].prefix_length for b, _ in chunk], device=device)
        wanted = max(plans[b].from_rest[c] for b, c in chunk)
        out = model(
            input_ids=rest["input_ids"],
            attention_mask=torch.cat([prefix["attention_mask"][owners_rows], rest["attention_mask"]], dim=1),
            position_ids=position_ids_from_mask(rest["attention_mask"], offsets),
            past_key_values=select_cache_rows(cache, owners_rows),
            use_cache=True,
            logits_to_keep=wanted,
        )
        # Column j of the kept logits predicts the row's target wanted - j from the end; a row's own option
        # tokens are its last `from_rest` targets, right-aligned like the rows themselves.
        targets = torch.zeros(len(chunk), wanted, dtype=torch.long)
        is_option = torch.zeros(len(chunk), wanted, dtype=torch.bool)
        for row, (b, c) in enumerate(chunk):
            sequence, count = plans[b].encoded.sequences[c], plans[b].from_rest[c]
            targets[row, wanted - count :] = torch.tensor(sequence[len(sequence) - count :])
            is_option[row, wanted - count :] = True
        targets, is_option = targets.to(device), is_option.to(device)
        log_probs = upcast(out.logits).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        totals = torch.where(is_option, log_probs, 0.0).sum(-1).tolist()
        for (b, c), total in zip(chunk, totals, strict=True):
            sums[b][c] += total

    return [
        [total / length for total, length in zip(sums[b], plan.encoded.option_lengths, strict=True)]
        for b, plan in enumerate(plans)
    ]


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding batch rows ``rows`` (repeats allowed) of ``cache``; ``cache`` itself is unchanged."""
    if not hasattr(cache, "layers"):
        raise TypeError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in selected.layers:
        layer.batch_select_indices(rows)
    return selected


# ---- generation ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers: at most ``min(max_new_tokens, max_length - prompt length)`` new tokens, stopping at the
    "\\n" token or EOS, decoded without special tokens and stripped (the harness). Batched over length-sorted,
    left-padded prompts."""
    prompts = encode_prompts(examples, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens)
    stop_ids = [newline_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    device = model_device(model)
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = {
            key: value.to(device) for key, value in left_pad(tokenizer, [prompts[i] for i in chosen]).items()
        }
        budgets = [min(max_new_tokens, max_length - len(prompts[i])) for i in chosen]
        generated = model.generate(
            **batch,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(budgets),
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        width = batch["input_ids"].shape[1]
        for row, (i, budget) in enumerate(zip(chosen, budgets, strict=True)):
            new_tokens = generated[row, width : width + budget].tolist()
            stop = next((j for j, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
            answers[i] = tokenizer.decode(new_tokens[:stop], skip_special_tokens=True).strip()
    return answers


# ---- evaluation ------------------------------------------------------------------------------------------------


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """The task's metric on ``examples``: ``{"score", "metric", "num_examples", "predictions", ...}``.

    Choice tasks: argmax of the candidate scores (first on ties), ``accuracy``; generation tasks: greedy answers,
    ``f1`` (reported as the score) and ``em``. The model is put in eval mode and restored afterwards.
    """
    if not examples:
        raise ValueError(f"nothing to evaluate: no {task.name} examples")
    was_training = model.training
    model.eval()
    try:
        if task.kind == "generation":
            predictions = generate_answers(
                model,
                tokenizer,
                examples,
                batch_size=batch_size,
                max_length=max_length,
                max_new_tokens=max_new_tokens,
            )
            f1 = float(np.mean([squad_f1(p, e.answers) for p, e in zip(predictions, examples, strict=True)]))
            em = float(
                np.mean([exact_match(p, e.answers) for p, e in zip(predictions, examples, strict=True)])
            )
            return {
                "score": f1,
                "metric": "f1",
                "f1": f1,
                "em": em,
                "num_examples": len(examples),
                "predictions": predictions,
            }
        scores = score_candidates(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
        chosen = [int(np.argmax(candidate_scores)) for candidate_scores in scores]
        acc = accuracy(chosen, [example.gold_indices for example in examples])
        return {
            "score": acc,
            "metric": "accuracy",
            "accuracy": acc,
            "num_examples": len(examples),
            "predictions": chosen,
            "scores": scores,
        }
    finally:
        model.train(was_training)
