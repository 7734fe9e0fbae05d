"""Training batches without wasted tokens: the shared-prompt view of verbalized classification tasks.

The harness's classification view (``chainlora.tasks.build_training_dataset``) puts every candidate of an
example in the batch as its own row: ``prompt + verbalizer[i]``. For the verbalized tasks (sst2, rte, cb, boolq,
wsc, wic, multirc) the candidates differ only in their **last token**, and each option is exactly that token.
The log-prob of that token comes from the logits at the previous position, which sees only the shared prefix,
so one row per example (the prefix) gives every candidate's score: the same loss from 1/n of the rows.

    view = shared_prompt_view(train_set)          # None unless every example qualifies
    sampler = tasks.length_grouped_sampler(view, batch_size)
    loss = shared_prompt_loss(model, SharedPromptCollator(tokenizer)(items))   # == the rows' loss

Length-grouped batches themselves come from the library: ``chainlora.tasks.length_grouped_sampler`` is HF's
``LengthGroupedSampler`` over the real lengths (a view's ``lengths`` work the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chainlora.tasks.scoring import left_pad, position_ids_from_mask


class SharedPromptDataset(Dataset):
    """One item per example: ``{"input_ids": prefix, "candidate_tokens": [...], "label": gold index}``.

    ``lengths[i]`` is the prefix length (what padding costs), for length-grouped sampling.
    """

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.lengths = [len(item["input_ids"]) for item in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def shared_prompt_item(item: dict[str, Any]) -> dict[str, Any] | None:
    """The shared-prompt form of one classification training item, or None if its candidates are not
    ``prefix + one token`` with that token as the whole option."""
    rows, option_lengths = item["input_ids"], item["option_lengths"]
    if any(length != 1 for length in option_lengths) or any(len(row) < 2 for row in rows):
        return None
    prefix = list(rows[0][:-1])
    if any(list(row[:-1]) != prefix for row in rows[1:]):
        return None
    return {"input_ids": prefix, "candidate_tokens": [row[-1] for row in rows], "label": item["label"]}


def shared_prompt_view(dataset: Any) -> SharedPromptDataset | None:
    """The shared-prompt view of a classification ``TrainingDataset``, or None when any example does not
    qualify (an LM-objective task, multi-token options, or a BPE merge across the prompt boundary)."""
    if getattr(dataset, "objective", None) != "classification":
        return None
    items = [shared_prompt_item(dataset[i]) for i in range(len(dataset))]
    if not items or any(item is None for item in items):
        return None
    return SharedPromptDataset(items)


@dataclass
class SharedPromptCollator:
    """Left-pads the prefixes; ``candidate_tokens`` (examples, most candidates) is padded with -1."""

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = left_pad(
            self.tokenizer, [item["input_ids"] for item in items], pad_to_multiple_of=self.pad_to_multiple_of
        )
        width = max(len(item["candidate_tokens"]) for item in items)
        batch["candidate_tokens"] = torch.tensor(
            [item["candidate_tokens"] + [-1] * (width - len(item["candidate_tokens"])) for item in items]
        )
        batch["labels"] = torch.tensor([item["label"] for item in items])
        return batch


def shared_prompt_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the candidates' log-probs, read from the last prefix position: equal to
    ``chainlora.tasks.training.rows_loss`` on the full classification batch (a single-token option's mean
    log-prob is that token's log-prob). ``chainlora.tasks.compute_loss`` dispatches to it."""
    attention_mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=1,
    ).logits[:, -1]  # (examples, V): predicts the token after the prefix
    log_probs = logits.float().log_softmax(-1)
    tokens = batch["candidate_tokens"].to(log_probs.device)  # (examples, candidates), -1 = none
    scores = log_probs.gather(-1, tokens.clamp(min=0)).masked_fill(tokens < 0, float("-inf"))
    return F.cross_entropy(scores, batch["labels"].to(scores.device))
