"""Evaluating on a user's data: held-out loss and perplexity, and greedy answers scored against references.

- :func:`heldout_loss`: the cross-entropy of every trained token of a split, averaged over those tokens (so
  ``perplexity = exp(loss)`` is the usual per-token perplexity), batch by batch in eval mode.
- :func:`generate`: greedy answers to the prompts (left-padded batches, stopped at EOS), as ``chat`` and the
  samples show them.
- :func:`reference_scores`: exact match and token F1 against each record's reference (the completion, or the
  last assistant turn), with SQuAD's answer normalisation (``chainlora.tasks.metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chainlora.data.batches import eval_batches, lm_loss
from chainlora.data.chat import render_text
from chainlora.data.encode import bos_prefix
from chainlora.data.formats import Record
from chainlora.tasks.metrics import exact_match, squad_f1


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel, dataset: Any, collator: Callable, batch_size: int
) -> dict[str, float]:
    """``{"loss", "perplexity"}`` of ``dataset`` (token-weighted); the model's train/eval mode is restored."""
    total, tokens = 0.0, 0
    for batch, _ in eval_batches(model, dataset, collator, batch_size):
        total += float(lm_loss(model, batch, reduction="sum"))
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def prompt_ids(
    record: Record, fmt: str, tokenizer: PreTrainedTokenizerBase, template: str | None
) -> list[int] | None:
    """What the model is given to answer ``record``: the prompt, or the conversation up to its last trained
    assistant turn with the template's generation prompt. None when the record has no reference."""
    if fmt == "prompt_completion":
        return list(tokenizer(record.prompt)["input_ids"])
    if fmt == "messages" and record.conversation is not None and template is not None:
        last = max(i for i, t in enumerate(record.conversation.trained) if t)
        text = render_text(
            tokenizer, record.conversation.messages[:last], template, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return None


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 8,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """Greedy answers to token-id ``prompts`` (each left-truncated to leave room for the answer, BOS kept),
    decoded without special tokens and stripped."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep = bos_prefix(tokenizer)
    limit = max(2, max_length - max_new_tokens)
    eos = [i for i in (tokenizer.eos_token_id, *stop_ids) if i is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            rows = []
            for i in chosen:
                ids = list(prompts[i])
                if len(ids) > limit:
                    ids = ids[:keep] + ids[len(ids) - (limit - keep) :]
                rows.append(ids)
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device
            )
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=pad,
            )
            for row, i in enumerate(chosen):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def reference_scores(records: Sequence[Record], answers: Sequence[str]) -> dict[str, float]:
    """``{"em", "f1"}``: exact match and token F1 of ``answers`` against each record's reference."""
    pairs = [(answer, record.reference) for record, answer in zip(records, answers, strict=True)]
    pairs = [(a, r) for a, r in pairs if r is not None]
    if not pairs:
        return {}
    return {
        "em": sum(exact_match(a, [r]) for a, r in pairs) / len(pairs),
        "f1": sum(squad_f1(a, [r]) for a, r in pairs) / len(pairs),
    }
