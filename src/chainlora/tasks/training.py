"""Training views of a task, as the MeZO harness trains them, ready for a Hugging Face ``Trainer``.

- ``objective == "classification"`` (sst2, rte, cb, boolq, wsc, wic, multirc, mcscript): every candidate of
  an example goes in the same batch; each candidate's mean option log-prob is a logit; cross-entropy against
  the gold index, averaged over examples.
- ``objective == "lm"`` (copa, record, squad, drop, tatqa, gsm8k): the gold candidate only; cross-entropy on
  its option tokens, averaged over all option tokens in the batch.

For the verbalized classification tasks the same loss also comes from one row per example, the shared prompt
(``chainlora.tasks.shared_prompt``). :func:`compute_loss` is the one training loss of either batch form: the
``TaskTrainer``, the recipes' dev loss and the benchmarks all call it.

Generation tasks are encoded with ``max_length - max_new_tokens`` as the harness does (it truncates their
training inputs like its generation prompts). Rows are left-padded; position ids follow the attention mask,
so padding never changes a row's result.

With a Hugging Face ``Trainer``, use (or subclass) ``TaskTrainer``; set ``remove_unused_columns=False`` (the
batch keys are not the model's arguments)::

    train_set = build_training_dataset(task, splits.train, tokenizer)
    dev_set = build_training_dataset(task, splits.dev, tokenizer)   # dev loss = the harness's model selection
    trainer = TaskTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
                          data_collator=TrainingCollator(tokenizer))

A custom Trainer calls ``compute_loss(model, inputs)`` from its own ``compute_loss`` and must set
``loss_is_scaled_for_ga = False``: the loss is a per-batch mean, and models that accept loss kwargs (Llama) would
otherwise make the Trainer skip the division by the gradient-accumulation steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from chainlora.seeding import derived_generator
from chainlora.tasks.base import Example, Objective, Task
from chainlora.tasks.encoding import DEFAULT_MAX_LENGTH, DEFAULT_MAX_NEW_TOKENS, encode_examples
from chainlora.tasks.scoring import left_pad, position_ids_from_mask
from chainlora.tasks.shared_prompt import shared_prompt_loss


class TrainingDataset(Dataset):
    """One item per example: ``{"input_ids": rows, "option_lengths": [...], "label": int}``.

    Classification: one row per candidate and ``label`` = the gold row; LM: the gold candidate's row only and
    ``label`` = 0. ``lengths[i]`` is item i's longest row (what padding costs), for length-grouped sampling.
    """

    def __init__(self, items: list[dict[str, Any]], objective: Objective) -> None:
        self.items = items
        self.objective = objective
        self.lengths = [max(len(row) for row in item["input_ids"]) for item in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def build_training_dataset(
    task: Task,
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> TrainingDataset:
    """Encode ``examples`` (train or dev) in the task's training view."""
    limit = max_length - max_new_tokens if task.kind == "generation" else max_length
    items = []
    for example, encoded in zip(
        examples, encode_examples(examples, tokenizer, max_length=limit), strict=True
    ):
        if task.objective == "classification":
            rows, lengths, label = encoded.sequences, encoded.option_lengths, example.gold
        else:
            rows, lengths, label = (
                [encoded.sequences[example.gold]],
                [encoded.option_lengths[example.gold]],
                0,
            )
        items.append(
            {"input_ids": [list(row) for row in rows], "option_lengths": list(lengths), "label": label}
        )
    return TrainingDataset(items, task.objective)


@dataclass
class TrainingCollator:
    """Flattens a list of items into one left-padded batch of rows.

    Keys: ``input_ids``/``attention_mask`` (rows, T), ``option_lengths`` (rows,), ``labels`` (examples,) and,
    when any item has several rows (classification), ``candidate_counts`` (examples,).
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None  # the longest row; chainlora.perf.pad_multiple gives 8 on CUDA

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [row for item in items for row in item["input_ids"]]
        batch = left_pad(self.tokenizer, rows, pad_to_multiple_of=self.pad_to_multiple_of)
        batch["option_lengths"] = torch.tensor([n for item in items for n in item["option_lengths"]])
        batch["labels"] = torch.tensor([item["label"] for item in items])
        counts = [len(item["input_ids"]) for item in items]
        if any(count > 1 for count in counts):
            batch["candidate_counts"] = torch.tensor(counts)
        return batch


def option_token_log_probs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    option_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last ``max(option_lengths)`` tokens of each left-padded row, and the mask of those that
    are option tokens: both (rows, max option length). Only those positions' logits are computed."""
    longest = int(option_lengths.max())
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=longest + 1,
    ).logits[:, :-1]  # (rows, longest, V): column j predicts input_ids[:, -longest + j]
    targets = input_ids[:, -longest:]
    token_log_probs = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    columns = torch.arange(longest, device=input_ids.device)
    is_option = columns[None, :] >= longest - option_lengths.to(input_ids.device)[:, None]
    return torch.where(is_option, token_log_probs, 0.0), is_option


def compute_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The harness's training loss of either batch form: a ``SharedPromptCollator`` batch (it has
    ``candidate_tokens``: :func:`~chainlora.tasks.shared_prompt.shared_prompt_loss`) or a ``TrainingCollator`` one
    (:func:`rows_loss`). Both forms of the same examples give the same number; this is the one training loss
    (``TaskTrainer`` and the recipes' dev loss call it)."""
    if "candidate_tokens" in batch:
        return shared_prompt_loss(model, batch)
    return rows_loss(model, batch)


def rows_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The harness's training loss for a ``TrainingCollator`` batch (classification if ``candidate_counts``)."""
    token_log_probs, is_option = option_token_log_probs(
        model, batch["input_ids"], batch["attention_mask"], batch["option_lengths"]
    )
    if "candidate_counts" not in batch:
        return -token_log_probs.sum() / is_option.sum()
    mean_log_probs = token_log_probs.sum(-1) / is_option.sum(-1)  # (rows,): one logit per candidate
    per_example = torch.split(mean_log_probs, batch["candidate_counts"].tolist())
    logits = torch.nn.utils.rnn.pad_sequence(list(per_example), batch_first=True, padding_value=float("-inf"))
    return F.cross_entropy(logits, batch["labels"].to(logits.device))


def length_grouped_sampler(
    dataset: Dataset, batch_size: int, generator: torch.Generator | None = None
) -> LengthGroupedSampler:
    """HF's length-grouped sampler over the dataset's real ``lengths`` (its default would count candidates)."""
    return LengthGroupedSampler(batch_size, lengths=dataset.lengths, generator=generator)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length grouping (random megabatches of 50 batches, each sorted by length, the longest batch first)
    whose order in epoch ``e`` is a pure function of ``(seed, e)``.

    HF's own sampler draws from the global RNG when iterated, so a run resumed mid-epoch would draw a different
    order than the one it was interrupted in; this one replays it exactly (``TaskTrainer`` sets the epoch).

    ``batch_size`` is the size of the groups: under data parallelism the *global* batch (per-device batch ×
    gradient accumulation × processes). The index stream is then the same for any split of that global batch, and
    each optimizer step takes the next global batch of it, which the data loader shards over the processes.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int) -> None:
        super().__init__(batch_size, lengths=list(lengths))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = derived_generator(self.seed, self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class TaskTrainer(Trainer):
    """A ``Trainer`` training with ``compute_loss`` (a per-batch mean, so scaled for gradient accumulation by the
    Trainer), whose ``train_sampling_strategy="group_by_length"`` groups by each item's real token length
    (any dataset with ``lengths``: ``TrainingDataset``, ``chainlora.tasks.shared_prompt.SharedPromptDataset``), in an order
    that depends only on ``data_seed`` and the epoch.

    Length groups are global batches (per-device batch × gradient accumulation × processes), so N processes with
    batch b train on exactly the batches of one process with batch N·b. The sampler's epoch is set by the Trainer
    before every epoch, on the sampler itself: under DDP a run resumed mid-epoch wraps it three deep (accelerate's
    skip and shard samplers), where the Trainer's own ``set_epoch`` does not reach it."""

    loss_is_scaled_for_ga = False
    _length_sampler: EpochSeededLengthGroupedSampler | None = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = compute_loss(model, inputs)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            args = self.args
            batch = args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
            seed = args.data_seed if args.data_seed is not None else args.seed
            self._length_sampler = EpochSeededLengthGroupedSampler(batch, dataset.lengths, seed)
            return self._length_sampler
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self._length_sampler is not None and "epoch" in kwargs:
            self._length_sampler.set_epoch(
                kwargs["epoch"]
            )  # the sampler itself, however deeply it is wrapped
        return super()._run_epoch(*args, **kwargs)
