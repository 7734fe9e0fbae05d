"""The pieces every task is built from: the rendered ``Example``, the ``Task`` base class, and row checks.

A task turns one raw row (a dict in the Hugging Face field layout) into an ``Example`` in two steps:
``extract`` checks and pulls out the fields the template needs (cheap: run on every row before any work
starts), and ``render`` builds the prompt and the verbalized candidate strings (run only on sampled rows).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

Kind = Literal["classification", "multiple_choice", "generation"]
Objective = Literal["classification", "lm"]
Metric = Literal["accuracy", "f1"]
Status = Literal["real", "partial", "substitute", "user data only"]
Pool = Literal["train", "test"]
"""``train``: the pool train and dev are drawn from; ``test``: the pool the test set is drawn from (the HF
``validation`` split for the paper's tasks, as in the MeZO harness: official test splits carry no labels)."""

POOLS: tuple[Pool, ...] = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One benchmark item, rendered: what both scoring and training consume.

    Invariants: every candidate string starts with ``prompt``; the scored "option" of candidate i is every token
    its full string adds beyond the prompt (a token-count difference, as the MeZO harness does); ``gold`` indexes
    ``candidates`` and is in ``gold_indices``. Strings are left-stripped and have no trailing spaces (the harness
    strips spaces and left-strips the final prompt).

    - classification / multiple choice: ``candidates`` holds every verbalized option; ``answers`` is empty.
    - generation: ``candidates`` holds the one training string (prompt + `` {answers[0]}\\n``) and ``gold == 0``;
      the model is evaluated by greedy generation from ``prompt`` against every string in ``answers``.
    """

    prompt: str
    candidates: tuple[str, ...]
    gold: int
    gold_indices: tuple[int, ...]
    answers: tuple[str, ...] = ()
    source_index: int = -1  # index of the raw row in its pool

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("an Example needs at least one candidate string")
        if not 0 <= self.gold < len(self.candidates) or self.gold not in self.gold_indices:
            raise ValueError(f"gold {self.gold} is not a valid candidate index of {len(self.candidates)}")


class RowProblem(Exception):
    """A raw row is unusable: ``field`` names the (dotted) field, ``problem`` says why. Data loaders turn it
    into a ``DataError`` naming the file and row."""

    def __init__(self, field: str, problem: str, location: str | None = None) -> None:
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem
        self.location = location  # set when the reader, not the row number, locates the row (nested files)


def split_files(train: tuple[str, ...], test: tuple[str, ...]) -> Mapping[Pool, tuple[str, ...]]:
    """A task's ``pool_files``: the file names (without extension) that may hold each pool, in order."""
    return MappingProxyType({"train": train, "test": test})


def clean_text(text: str) -> str:
    """The harness's normalisation of a prompt string: spaces stripped at both ends, then left-stripped."""
    return text.strip(" ").lstrip()


class Task:
    """A benchmark task: template, verbalizers, candidates, gold, metric, and where its data lives.

    Subclasses set the class attributes and implement ``extract`` and ``render``.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    objective: ClassVar[
        Objective
    ]  # "classification": CE over candidates' mean option log-probs; "lm": gold only
    metric: ClassVar[Metric]
    status: ClassVar[Status] = "real"
    licence: ClassVar[str] = "unstated"
    note: ClassVar[str] = ""  # one line for the task table (caveats, what it substitutes for)
    substitutes: ClassVar[tuple[str, ...]] = ()  # task names offered when this task has no data
    default_num_dev: ClassVar[int] = 500
    # File names (without extension) holding each pool, first match wins.
    pool_files: ClassVar[Mapping[Pool, tuple[str, ...]]] = split_files(train=("train",), test=("validation",))
    # (dataset path, config name, {pool: split}) on the Hugging Face hub, used only when online.
    hub: ClassVar[tuple[str, str | None, Mapping[Pool, str]] | None] = None

    def extract(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Check a raw row and return the values ``render`` needs; raise ``RowProblem`` if unusable."""
        raise NotImplementedError

    def render(self, fields: dict[str, Any]) -> Example:
        """Build the Example (prompt, full candidate strings, gold) from ``extract``'s values."""
        raise NotImplementedError

    def example(self, row: Mapping[str, Any], source_index: int = -1) -> Example:
        """Render one raw row, with the harness's whitespace normalisation applied to every string."""
        rendered = self.render(self.extract(row))
        return Example(
            prompt=clean_text(rendered.prompt),
            candidates=tuple(clean_text(c) for c in rendered.candidates),
            gold=rendered.gold,
            gold_indices=rendered.gold_indices,
            answers=rendered.answers,
            source_index=source_index,
        )

    def read_original(self, path: Any) -> list[tuple[str, dict[str, Any]]] | None:
        """Rows of a ``.json`` file in the dataset's own original format, as (location, row) pairs; ``None``
        when this task has no original format (then a ``.json`` file must be a list of row objects)."""
        return None

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.kind}, {self.metric}, {self.status}>"


# ---- field accessors: each returns a checked value or raises RowProblem --------------------------------------


def field_value(row: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (``answers.text``); nested values given as JSON or Python-literal strings
    (how CSV files carry them) are parsed."""
    value: Any = row
    walked: list[str] = []
    for key in path.split("."):
        if walked:
            value = _parse_structured(value, ".".join(walked))
            if not isinstance(value, Mapping):
                raise RowProblem(".".join(walked), f"expected an object with '{key}', got {_kind(value)}")
        walked.append(key)
        if key not in value or value[key] is None:
            raise RowProblem(".".join(walked), "missing")
        value = value[key]
    return value


def text_field(row: Mapping[str, Any], path: str, *, allow_empty: bool = False) -> str:
    value = field_value(row, path)
    if not isinstance(value, str):
        raise RowProblem(path, f"expected text, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise RowProblem(path, "empty text")
    return value


def label_field(row: Mapping[str, Any], path: str, num_labels: int) -> int:
    """An integer class label in ``range(num_labels)``; JSON booleans and digit strings (CSV) are accepted."""
    value = field_value(row, path)
    integral_float = isinstance(value, float) and value.is_integer()
    digit_text = isinstance(value, str) and value.strip().lstrip("-").isdigit()
    if not (isinstance(value, int) or integral_float or digit_text):  # bool is an int
        raise RowProblem(path, f"expected an integer label, got {value!r}")
    label = int(value)
    if not 0 <= label < num_labels:
        raise RowProblem(path, f"label {label} out of range 0..{num_labels - 1}")
    return label


def text_list_field(row: Mapping[str, Any], path: str, *, min_items: int = 1) -> list[str]:
    value = _parse_structured(field_value(row, path), path)
    if hasattr(value, "tolist"):  # numpy arrays from parquet readers
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise RowProblem(path, f"expected a list of texts, got {_kind(value)}")
    if len(value) < min_items:
        raise RowProblem(path, f"expected at least {min_items} item(s), got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RowProblem(f"{path}[{i}]", f"expected text, got {_kind(item)}")
    return list(value)


def _parse_structured(value: Any, path: str) -> Any:
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    raise RowProblem(path, "expected a list or object (or its JSON text), got plain text")


def _kind(value: Any) -> str:
    return type(value).__name__
