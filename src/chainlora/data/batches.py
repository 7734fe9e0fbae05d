"""Training batches of encoded examples, and the causal-LM loss on their trained tokens.

Two batch forms, the same loss:

- padded: rows right-padded to the longest in the batch (``attention_mask`` marks the padding);
- packed (``data.packing``): padding-free, transformers' ``DataCollatorWithFlattening``: the batch's examples
  concatenated into one row, ``position_ids`` restarting at 0 for each, no attention mask. transformers builds a
  block-diagonal causal mask from such position ids (``masking_utils.find_packed_sequence_indices``), so no token
  attends across examples and the loss and gradients equal the padded batch's (``tests/test_user_data.py``).

:func:`lm_loss` is the mean cross-entropy over every trained token of the batch (TRL's and the harness's
normalisation); logits are computed only at the positions that predict a trained token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import DataCollatorWithFlattening, PreTrainedModel

from chainlora.data.encode import IGNORE_INDEX, EncodedExample


class EncodedDataset(Dataset):
    """Encoded examples as Trainer items ``{"input_ids", "labels"}``; ``lengths`` for length grouping."""

    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = list(examples)
        self.lengths = [len(example) for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"input_ids": list(example.input_ids), "labels": list(example.labels)}


@dataclass
class PaddedCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the longest row, rounded up
    to ``pad_to_multiple_of`` when set (``chainlora.perf.pad_multiple``: 8 on CUDA); adds ``attention_mask``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packed_collator() -> DataCollatorWithFlattening:
    """transformers' padding-free collator: one row per batch, ``position_ids`` per example, the first label of
    each example set to -100 (it would be predicted from the previous example)."""
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def lm_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], *, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the trained tokens (``labels != -100``), mean over them (``reduction="sum"``: their
    sum). Position t's logits predict token t+1; only positions that predict a trained token get logits."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    needed = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # input positions whose logits matter
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    logits = model(**kwargs, logits_to_keep=needed).logits  # (rows, len(needed), vocab)
    chosen = targets[:, needed.to(targets.device)].to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        chosen.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def eval_batches(
    model: torch.nn.Module, dataset: Any, collator: Callable, batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """``dataset`` in order as collated batches on the model's device, with how many examples each holds, the
    model in eval mode meanwhile (its train/eval mode restored afterwards). Iterate under ``torch.no_grad``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            yield {k: v.to(device) for k, v in collator(items).items()}, len(items)
    finally:
        model.train(was_training)
