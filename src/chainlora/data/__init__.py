"""Your own data: read it (``datasets``), detect its format, check every row, split it, and encode it.

    data = UserData.load(DataSpec(path="chat.jsonl"))          # every row checked; one error line if not
    splits = data.split(seed=0, num_dev=None, num_eval=None)    # the files' own splits, else a seeded split
    train, stats = encode_records(splits.train, data.format, tokenizer, max_length=1024, template=...)

The formats (``text``, ``prompt_completion``, ``messages``, ``choices``) and their detection are described in
:mod:`chainlora.data.formats`; tokenization, truncation and label masks in :mod:`chainlora.data.encode`;
padded and packed batches and the loss in :mod:`chainlora.data.batches`; evaluation in
:mod:`chainlora.data.evaluate`. ``choices`` data is trained and scored exactly like the benchmark tasks
(candidate log-likelihood): :meth:`UserData.choice_task` and :meth:`UserData.examples` hand it to
:mod:`chainlora.tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chainlora.config.data import DataSpec
from chainlora.data.batches import EncodedDataset, PaddedCollator, lm_loss, packed_collator
from chainlora.data.encode import EncodedExample, EncodeStats, encode_records
from chainlora.data.files import DataFiles, locate, read
from chainlora.data.formats import Layout, Record, resolve_layout, to_records
from chainlora.errors import DataError
from chainlora.tasks.base import Example, Task
from chainlora.tasks.sampling import seeded_permutation

DEFAULT_DEV_FRACTION = 0.1
DEFAULT_MAX_DEV = 500

__all__ = [
    "DataSpec",
    "EncodeStats",
    "EncodedDataset",
    "EncodedExample",
    "PaddedCollator",
    "Record",
    "UserData",
    "UserSplits",
    "encode_records",
    "lm_loss",
    "packed_collator",
]


@dataclass(frozen=True)
class UserSplits:
    """Train / dev / test records of one seed, and where each came from (recorded in ``metrics.json``)."""

    train: list[Record]
    dev: list[Record]
    test: list[Record]
    origin: dict[str, str] = field(
        default_factory=dict
    )  # split -> "validation.jsonl" / "seeded split of ..."

    def describe(self) -> dict[str, Any]:
        return {
            name: {"examples": len(getattr(self, name)), "from": self.origin.get(name, "")}
            for name in ("train", "dev", "test")
        }


class ChoiceTask(Task):
    """A user's ``choices`` dataset as a task: candidates scored by mean log-likelihood, accuracy."""

    name = "user"
    kind = "multiple_choice"
    objective = "classification"
    metric = "accuracy"
    status = "real"


@dataclass
class UserData:
    """A user's dataset, read and checked: its files, its format, and every row as a :class:`Record`."""

    spec: DataSpec
    files: DataFiles
    layout: Layout
    records: dict[str, list[Record]]

    @property
    def format(self) -> str:
        return self.layout.format

    @classmethod
    def load(cls, spec: DataSpec) -> UserData:
        """Locate and read ``spec.path``, resolve the format, check every row (``DataError`` on the first bad
        one, naming file, row and field). Reads nothing else and writes nothing."""
        if spec.path is None:
            raise DataError("data.path: no data given (--data FILE, or a task with --task)")
        files = locate(spec.path)
        tables = read(files)
        train_where = str(files.files.get("train", files.path))
        layout = resolve_layout(list(tables["train"].column_names), spec, train_where, tables["train"][0])
        records: dict[str, list[Record]] = {}
        for split, table in tables.items():
            where = str(files.files.get(split, files.path)) + (f" [{split}]" if files.kind == "saved" else "")
            split_layout = (
                resolve_layout(list(table.column_names), spec, where, table[0])
                if split != "train"
                else layout
            )
            if split_layout.format != layout.format:
                raise DataError(
                    f"{where}: its rows are {split_layout.format}, the train rows are {layout.format}; "
                    "every split must have the same format"
                )
            records[split] = to_records(table, split_layout, spec, where)
        if spec.chat and layout.format != "choices":
            raise DataError(
                f"data.chat: applies to choices data, these rows are {layout.format} (prompt/completion data goes "
                "into the chat template with data.format: messages)"
            )
        return cls(spec, files, layout, records)

    def describe(self) -> str:
        rows = ", ".join(f"{len(r)} {split}" for split, r in self.records.items())
        return f"{self.files.describe()}: {self.layout.describe()}, {rows} rows"

    def split(
        self,
        seed: int,
        *,
        num_train: int | None = None,
        num_dev: int | None = None,
        num_eval: int | None = None,
    ) -> UserSplits:
        """The records of seed ``seed``. A validation/test file is used as dev/test (``num_dev``/``num_eval``
        draw that many of it); without one, dev (``num_dev``, default 10% up to 500) and test (``num_eval``,
        default none) are drawn from the train rows by a seeded permutation, disjoint from train.
        ``num_train`` keeps that many of the remaining train rows (default all)."""
        pool = self.records["train"]
        order = [pool[i] for i in seeded_permutation(len(pool), seed)]
        origin: dict[str, str] = {}
        name = self.files.files["train"].name if self.files.kind != "saved" else "train split"

        def from_file(split: str, wanted: int | None) -> list[Record]:
            rows = self.records[split]
            if wanted is not None and wanted < len(rows):
                rows = [rows[i] for i in sorted(seeded_permutation(len(rows), seed)[:wanted])]
            label = self.files.files[split].name if self.files.kind != "saved" else f"{split} split"
            origin["dev" if split == "validation" else split] = (
                f"{label} ({len(rows)} of {len(self.records[split])})"
            )
            return rows

        if "test" in self.records:
            test = from_file("test", num_eval)
        else:
            count = num_eval or 0
            test, order = order[:count], order[count:]
            if count:
                origin["test"] = f"{count} rows of {name}, drawn with seed {seed}"
        if "validation" in self.records:
            dev = from_file("validation", num_dev)
        else:
            count = (
                num_dev
                if num_dev is not None
                else min(round(DEFAULT_DEV_FRACTION * len(order)), DEFAULT_MAX_DEV)
            )
            dev, order = order[:count], order[count:]
            if count:
                origin["dev"] = f"{count} rows of {name}, drawn with seed {seed}"
        train = order[:num_train] if num_train is not None else order
        origin["train"] = f"{len(train)} rows of {name}" + (
            f", seed {seed}" if len(train) < len(pool) else ""
        )
        if not train:
            raise DataError(
                f"{name}: no rows left to train on after taking dev ({len(dev)}) and test ({len(test)})"
            )
        return UserSplits(sorted(train, key=lambda r: r.row), dev, test, origin)

    # -- choices data goes through the benchmark tasks' path ------------------------------------------------
    def choice_task(self) -> Task:
        if self.format != "choices":
            raise ValueError(f"{self.format} data is not scored by candidates")
        return ChoiceTask()

    @staticmethod
    def examples(records: Sequence[Record]) -> list[Example]:
        """``choices`` records as benchmark ``Example``s: candidate i = prompt + separator + choice i, the
        separator a space unless the prompt ends in whitespace or the choice starts with it."""
        out = []
        for record in records:
            assert record.prompt is not None and record.choices is not None and record.label is not None
            candidates = tuple(
                record.prompt + ("" if record.prompt[-1:].isspace() or c[:1].isspace() else " ") + c
                for c in record.choices
            )
            out.append(
                Example(record.prompt, candidates, record.label, (record.label,), source_index=record.row - 1)
            )
        return out
