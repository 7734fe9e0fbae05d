"""What a run trains on and how it is scored: one of the paper's benchmark tasks, or your own data.

    workload = load_workload(config)                     every row read and checked; nothing written
    train_set, dev_set, collator, batching = workload.datasets(tokenizer, config)
    workload.loss(model, batch)                          the one training loss of this workload's batches
    workload.evaluate(model, tokenizer, "dev" | "test")  {"score", "metric", "loss", ...}

Two kinds, one interface:

- :class:`TaskWorkload`: a benchmark task (``--task``), or your data in the ``choices`` format, which is trained
  and scored exactly like the benchmark tasks (``chainlora.tasks``: candidates by mean log-likelihood,
  cross-entropy over the candidates, accuracy).
- :class:`SFTWorkload`: your ``text``, ``prompt_completion`` or ``messages`` data (``chainlora.data``): the
  causal-LM loss on the trained tokens; evaluated by held-out loss and perplexity and, where the data has
  references, by greedy answers scored with exact match and token F1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from chainlora import data as userdata
from chainlora import perf, tasks
from chainlora.config import TrainConfig
from chainlora.data.batches import eval_batches
from chainlora.data.evaluate import generate, heldout_loss, prompt_ids, reference_scores
from chainlora.errors import ConfigError
from chainlora.tasks.shared_prompt import SharedPromptCollator, shared_prompt_view

logger = logging.getLogger("chainlora")

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "em": True, "loss": False, "perplexity": False}
DEFAULT_TASK_SIZES = {"num_train": 1000, "num_eval": 1000}  # the paper's (num_dev: the task's own default)


class Workload:
    """The interface the train recipe uses; see the module docstring."""

    name: str  # the task's name, or your data file's stem
    metric: str  # what ``score`` is: accuracy, f1, or perplexity (text data)
    train: Sequence[Any]
    dev: Sequence[Any]
    test: Sequence[Any]
    source: str  # one line: where the rows came from

    def datasets(
        self, tokenizer: PreTrainedTokenizerBase, config: TrainConfig
    ) -> tuple[Any, Any | None, Callable, str]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, split: str, *, score: bool = True
    ) -> dict[str, Any]:
        raise NotImplementedError

    def samples(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, str]]:
        """A few dev generations to look at (prompt, reference, output); none for benchmark tasks."""
        return []

    def describe(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the data (``data``)."""
        return {"source": self.source}


def load_workload(config: TrainConfig) -> Workload:
    """The run's workload, its rows read and checked and its seed's splits drawn; one ``ChainLoRAError`` line
    for anything wrong with the task or the data. Writes nothing."""
    config.workload_name  # noqa: B018 - refuses a config that names neither a task nor data
    if config.task is not None:
        workload: Workload = TaskWorkload.from_task(config)
    else:
        user = userdata.UserData.load(config.data)
        logger.info("data: %s", user.describe())
        splits = user.split(
            config.seed, num_train=config.num_train, num_dev=config.num_dev, num_eval=config.num_eval
        )
        workload = (
            TaskWorkload.from_choices(config, user, splits)
            if user.format == "choices"
            else SFTWorkload(config, user, splits)
        )
    if not workload.train:
        raise ConfigError(f"num_train: {workload.name} drew no training examples")
    if config.selection != "last" and not workload.dev:
        raise ConfigError(f"selection: {config.selection!r} needs a dev set, but {workload.name} has none")
    if config.num_eval and not workload.test:
        raise ConfigError(f"num_eval: {workload.name} drew no test examples")
    return workload


# ----------------------------------------------------------------------------------- benchmark tasks


class TaskWorkload(Workload):
    """A benchmark task, or ``choices`` data as a task: examples with candidates (``chainlora.tasks``)."""

    def __init__(
        self,
        config: TrainConfig,
        task: tasks.Task,
        name: str,
        splits: tuple[list[tasks.Example], list[tasks.Example], list[tasks.Example]],
        source: str,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.config, self.task, self.name, self.source = config, task, name, source
        self.train, self.dev, self.test = splits
        self.metric = task.metric
        self.info = info or {}
        self._dev_set: Any = None
        self._collator: Callable | None = None

    @classmethod
    def from_task(cls, config: TrainConfig) -> TaskWorkload:
        task = tasks.get_task(config.task)
        data = tasks.load_task_data(task, data=config.data.path)
        drawn = data.sample(
            config.seed,
            num_train=config.num_train if config.num_train is not None else DEFAULT_TASK_SIZES["num_train"],
            num_dev=config.num_dev,
            num_eval=config.num_eval if config.num_eval is not None else DEFAULT_TASK_SIZES["num_eval"],
            harness_quirks=config.harness_quirks,
        )
        return cls(config, task, task.name, (drawn.train, drawn.dev, drawn.test), drawn.source.description)

    @classmethod
    def from_choices(
        cls, config: TrainConfig, user: userdata.UserData, splits: userdata.UserSplits
    ) -> TaskWorkload:
        to_examples = userdata.UserData.examples
        name = config.workload_name
        parts = (to_examples(splits.train), to_examples(splits.dev), to_examples(splits.test))
        info = {"format": user.format, "layout": user.layout.describe(), "splits": splits.describe()}
        workload = cls(config, user.choice_task(), name, parts, user.files.describe(), info)
        if config.data.chat:
            workload._unrendered = (splits.train, splits.dev, splits.test)
        return workload

    _unrendered: tuple[Sequence[userdata.Record], ...] | None = None

    def _render_chat(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """``choices`` data with ``data.chat``: every prompt rendered as the user turn of the chat template
        (once the tokenizer is known), cut from the left inside the turn where prompt + longest choice would
        exceed ``max_length``."""
        if self._unrendered is None:
            return
        from chainlora.data.chat import chat_prompt, resolve_chat_template

        data = self.config.data
        template = resolve_chat_template(tokenizer, data.chat_template, self.config.model)
        cut = 0

        def render(records: Sequence[userdata.Record]) -> list[tasks.Example]:
            nonlocal cut
            rendered = []
            for record in records:
                assert record.prompt is not None and record.choices is not None
                longest = max(
                    len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in record.choices
                )
                prompt, was_cut = chat_prompt(
                    tokenizer,
                    record.prompt,
                    template,
                    system=data.system_prompt,
                    max_tokens=self.config.max_length - longest,
                )
                cut += was_cut
                rendered.append(dataclasses.replace(record, prompt=prompt))
            return userdata.UserData.examples(rendered)

        self.train, self.dev, self.test = (render(records) for records in self._unrendered)
        self.info["chat"] = {
            "template": "data.chat_template" if data.chat_template else "the model's",
            "prompts_cut": cut,
        }
        if cut:
            logger.info("data: %d prompt(s) cut from the left inside the user turn to fit max_length", cut)
        self._unrendered = None

    def datasets(self, tokenizer, config):
        """The task's training view; one row per example (the shared prompt) where every example qualifies and
        ``shared_prompt`` is on, else the harness's rows (one per candidate)."""
        self._render_chat(tokenizer)
        train_set = tasks.build_training_dataset(
            self.task, self.train, tokenizer, max_length=config.max_length
        )
        dev_set = None
        if self.dev:
            dev_set = tasks.build_training_dataset(
                self.task, self.dev, tokenizer, max_length=config.max_length
            )
        multiple = perf.pad_multiple(perf.training_device(), config.pad_to_multiple_of)
        collator: Callable = tasks.TrainingCollator(tokenizer, pad_to_multiple_of=multiple)
        batching = "rows"
        if config.shared_prompt:
            train_view = shared_prompt_view(train_set)
            dev_view = shared_prompt_view(dev_set) if dev_set is not None else None
            if train_view is not None and (dev_set is None or dev_view is not None):
                train_set, dev_set = train_view, dev_view
                collator = SharedPromptCollator(tokenizer, pad_to_multiple_of=multiple)
                batching = "shared_prompt"
        self._dev_set, self._collator = dev_set, collator
        return train_set, dev_set, collator, batching

    def loss(self, model, batch):
        return tasks.training.compute_loss(model, batch)  # module lookup: tests patch it

    def evaluate(self, model, tokenizer, split, *, score=True):
        self._render_chat(tokenizer)
        examples = self.dev if split == "dev" else self.test
        out: dict[str, Any] = {"metric": self.metric}
        if split == "dev" and self._dev_set is not None:
            out["loss"] = dataset_loss(model, self._dev_set, self._collator, self.config.eval_batch_size)
        if score:
            result = tasks.evaluate(
                model,
                tokenizer,
                self.task,
                examples,
                batch_size=self.config.eval_batch_size,
                max_length=self.config.max_length,
            )
            out |= {k: v for k, v in result.items() if k != "metric"}
        return out

    def describe(self):
        return {"source": self.source, **self.info}


@torch.no_grad()
def dataset_loss(model: torch.nn.Module, dataset: Any, collator: Callable, batch_size: int) -> float:
    """The harness's training loss over ``dataset`` (the dev loss), averaged over examples; the model's mode is
    kept."""
    total, count = 0.0, 0
    for batch, size in eval_batches(model, dataset, collator, batch_size):
        total += float(tasks.compute_loss(model, batch)) * size
        count += size
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ your data


class SFTWorkload(Workload):
    """Your ``text`` / ``prompt_completion`` / ``messages`` data: token labels, causal-LM loss."""

    def __init__(self, config: TrainConfig, user: userdata.UserData, splits: userdata.UserSplits) -> None:
        self.config, self.user, self.splits = config, user, splits
        self.name = config.workload_name
        self.train, self.dev, self.test = splits.train, splits.dev, splits.test
        self.source = user.files.describe()
        self.format = user.format
        self.has_references = self.format in ("prompt_completion", "messages")
        self.metric = "f1" if self.has_references else "perplexity"
        self.template: str | None = None
        self.stats: dict[str, Any] = {}
        self._sets: dict[str, Any] = {}
        self._collator: Callable | None = None
        if config.selection == "dev_score" and not self.has_references:
            raise ConfigError(
                f"selection: dev_score needs answers to score; {self.format} data has only its loss: use dev_loss"
            )

    def _encode(self, split: str, records: Sequence[userdata.Record], tokenizer) -> userdata.EncodedDataset:
        where = f"{self.source} [{split}]"
        encoded, stats = userdata.encode_records(
            records,
            self.format,
            tokenizer,
            max_length=self.config.max_length,
            template=self.template,
            where=where,
        )
        self.stats[split] = stats.to_dict()
        if stats.cut or stats.dropped:
            logger.info(
                "data: %s: %d of %d example(s) cut from the left to fit max_length %d, %d dropped (their answer "
                "alone is longer)",
                split,
                stats.cut,
                len(records),
                self.config.max_length,
                stats.dropped,
            )
        return userdata.EncodedDataset(encoded)

    def datasets(self, tokenizer, config):
        if self.format == "messages":
            from chainlora.data.chat import resolve_chat_template

            self.template = resolve_chat_template(tokenizer, config.data.chat_template, config.model)
        for split, records in (("train", self.train), ("dev", self.dev), ("test", self.test)):
            if records:
                self._sets[split] = self._encode(split, records, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        multiple = perf.pad_multiple(perf.training_device(), config.pad_to_multiple_of)
        self._collator = (
            userdata.packed_collator() if config.data.packing else userdata.PaddedCollator(pad, multiple)
        )
        return (
            self._sets["train"],
            self._sets.get("dev"),
            self._collator,
            ("packed" if config.data.packing else "padded"),
        )

    def loss(self, model, batch):
        return userdata.lm_loss(model, batch)

    def evaluate(self, model, tokenizer, split, *, score=True):
        dataset = self._sets.get(split)
        records = self.dev if split == "dev" else self.test
        out: dict[str, Any] = {"metric": self.metric, "num_examples": len(records)}
        if dataset is not None:
            padded = userdata.PaddedCollator(
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            )
            out |= heldout_loss(model, dataset, padded, self.config.eval_batch_size)
        if score and self.has_references:
            answers = self.answer(model, tokenizer, records)
            out |= reference_scores(records, answers)
            out["predictions"] = answers
        out["score"] = out.get("f1") if self.has_references else out.get("perplexity")
        if out["score"] is None:
            out.pop("score")
        return out

    def answer(self, model, tokenizer, records: Sequence[userdata.Record]) -> list[str]:
        """Greedy answers to ``records``' prompts (the conversation up to its last trained turn)."""
        prompts = [prompt_ids(r, self.format, tokenizer, self.template) or [] for r in records]
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=self.config.data.max_new_tokens,
            max_length=self.config.max_length,
            batch_size=self.config.eval_batch_size,
        )

    def samples(self, model, tokenizer):
        records = list(self.dev[: self.config.data.eval_samples])
        if not records or not self.has_references:
            return []
        answers = self.answer(model, tokenizer, records)
        out = []
        for record, output in zip(records, answers, strict=True):
            prompt = tokenizer.decode(prompt_ids(record, self.format, tokenizer, self.template) or [])
            out.append(
                {"row": record.row, "prompt": prompt, "reference": record.reference or "", "output": output}
            )
        return out

    def describe(self):
        return {
            "source": self.source,
            "format": self.format,
            "layout": self.user.layout.describe(),
            "splits": self.splits.describe(),
            "fitted": self.stats,
            "packing": self.config.data.packing,
        }


def improvement_line(metric: str, before: float | None, after: float | None) -> str | None:
    """One plain line saying what fine-tuning changed: ``test accuracy 57.0% (0-shot) → 71.0% (+14.0 points)``."""
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return None
    higher = HIGHER_IS_BETTER.get(metric, True)
    if metric in ("accuracy", "f1", "em"):
        change = (after - before) * 100
        verdict = (
            "improved"
            if (change > 0) == higher and change != 0
            else ("unchanged" if change == 0 else "got worse")
        )
        return f"test {metric} {verdict}: {before:.1%} (0-shot) → {after:.1%} ({change:+.1f} points)"
    ratio = after / before if before else math.inf
    verdict = "improved" if (after < before) != higher and after != before else "did not improve"
    return f"test {metric} {verdict}: {before:.4g} (0-shot) → {after:.4g} (×{ratio:.3f})"


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation result (drops predictions and per-candidate scores)."""
    return {
        k: v
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "num_examples"
    }


__all__ = [
    "HIGHER_IS_BETTER",
    "SFTWorkload",
    "TaskWorkload",
    "Workload",
    "dataset_loss",
    "improvement_line",
    "load_workload",
    "scalar_metrics",
]
