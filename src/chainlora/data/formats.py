"""The formats of a user's dataset, detected from its columns, and every row checked into one canonical record.

=====================  =========================================  ====================================
format                 columns (after ``data.columns``)           trained tokens
=====================  =========================================  ====================================
``text``               ``text``                                   every token (and EOS)
``prompt_completion``  ``prompt``, ``completion``                 the completion (and EOS)
``messages``           ``messages``: ``[{role, content}, ...]``   assistant turns, as the chat template
                                                                  renders them (end-of-turn included)
``choices``            ``prompt``, ``choices`` (or                none: candidates scored as logits,
                       ``data.choices``), ``label``               like the benchmark tasks
=====================  =========================================  ====================================

Detection (``data.format: auto``), first match wins: ``messages`` (or ShareGPT's ``conversations`` with
``from``/``value``), ``choices`` + ``label``, ``prompt`` + ``completion``, ``text``. Without a column map, two
common instruction layouts are recognised: alpaca's ``instruction`` / ``input`` / ``output`` and
``question`` / ``answer`` (both become ``prompt_completion``). ``prompt`` and ``completion`` given as lists of
messages (TRL's conversational prompt-completion) become a conversation whose prompt turns are not trained.
Forcing ``format: messages`` on prompt/completion rows renders them as a user turn and an assistant turn with
the model's chat template.

A bad row is one :class:`~chainlora.errors.DataError` line naming the file, the row (1-based, as in the file)
and the field: nothing is trained on a dataset with a bad row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chainlora.config.data import DataSpec, template_fields
from chainlora.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}
INSTRUCTION_LAYOUTS: tuple[tuple[frozenset[str], dict[str, str | list[str]]], ...] = (
    (frozenset({"instruction", "output"}), {"prompt": ["instruction", "input"], "completion": "output"}),
    (frozenset({"question", "answer"}), {"prompt": "question", "completion": "answer"}),
)


@dataclass(frozen=True)
class Conversation:
    """Chat turns as the chat template takes them; ``trained[i]`` says whether turn i is learned."""

    messages: tuple[dict[str, Any], ...]
    trained: tuple[bool, ...]


@dataclass(frozen=True)
class Record:
    """One checked row in canonical form (which fields are set depends on the format)."""

    row: int  # 1-based position in its split file
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    conversation: Conversation | None = None
    choices: tuple[str, ...] | None = None
    label: int | None = None

    @property
    def reference(self) -> str | None:
        """The answer a generation is scored against: the completion, or the last trained assistant turn."""
        if self.completion is not None:
            return self.completion
        if self.conversation is not None:
            last = max(i for i, t in enumerate(self.conversation.trained) if t)
            return self.conversation.messages[last].get("content")
        return None


@dataclass(frozen=True)
class Layout:
    """The resolved format and where each canonical field comes from (column names, or a template)."""

    format: str
    sources: dict[str, list[str]]  # canonical field -> the columns it is read from (several: joined)
    sharegpt: bool = False  # messages come as [{from, value}]
    template: str | None = None  # data.prompt_template: the prompt is built from the row's columns

    def describe(self) -> str:
        mapped = ", ".join(
            f"{field}←{'+'.join(cols)}" for field, cols in self.sources.items() if cols != [field]
        )
        return self.format + (f" ({mapped})" if mapped else "")


class RowError(Exception):
    """A problem with one field of one row (turned into a DataError naming file and row)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


# ------------------------------------------------------------------------------------------------ layout


def resolve_layout(
    columns: Sequence[str], spec: DataSpec, where: str, first_row: Mapping[str, Any] | None = None
) -> Layout:
    """The format of a dataset with ``columns`` (and ``first_row``, which tells conversational prompt and
    completion lists apart from text) and the source of each field, or one ``DataError`` line."""
    available = set(columns)
    sources: dict[str, list[str]] = {}
    for field, value in spec.columns.items():
        names = value if isinstance(value, list) else [value]
        missing = [n for n in names if n not in available]
        if missing:
            raise DataError(
                f"data.columns.{field}: column {missing[0]!r} is not in {where} (its columns: {_names(columns)})"
            )
        sources[field] = list(names)
    for field in ("text", "prompt", "completion", "messages", "choices", "label", "system"):
        if field not in sources and field in available:
            sources[field] = [field]
    if spec.prompt_template is not None:
        missing = [n for n in template_fields(spec.prompt_template) if n not in available]
        if missing:
            raise DataError(
                f"data.prompt_template: {{{missing[0]}}} is not a column of {where} (its columns: {_names(columns)})"
            )
        sources["prompt"] = ["<prompt_template>"]
    sharegpt = False
    if "messages" not in sources and "conversations" in available and not spec.columns:
        sources["messages"], sharegpt = ["conversations"], True
    if not spec.columns and "prompt" not in sources:
        for needed, mapping in INSTRUCTION_LAYOUTS:
            if needed <= available:
                for field, value in mapping.items():
                    names = value if isinstance(value, list) else [value]
                    sources.setdefault(field, [n for n in names if n in available])
                break
    fmt = spec.format if spec.format != "auto" else _detect(sources, spec)
    if fmt == "prompt_completion" and first_row is not None and spec.format == "auto":
        values = [
            first_row.get(sources[f][0]) for f in ("prompt", "completion") if len(sources.get(f, [])) == 1
        ]
        if any(isinstance(v, list) for v in values):
            fmt = "messages"  # TRL's conversational prompt-completion: lists of messages
    if fmt is None:
        raise DataError(
            f"{where}: cannot tell the data format from its columns ({_names(columns)}): expected messages, "
            "prompt + completion, prompt + choices + label, or text; map yours with data.columns, or set data.format"
        )
    required = {
        "text": ("text",),
        "prompt_completion": ("prompt", "completion"),
        "messages": ("messages",) if "messages" in sources else ("prompt", "completion"),
        "choices": ("prompt", "label") + (() if spec.choices else ("choices",)),
    }[fmt]
    missing_fields = [f for f in required if f not in sources]
    if missing_fields:
        raise DataError(
            f"data.format {fmt} needs a {missing_fields[0]!r} column, which {where} lacks "
            f"(its columns: {_names(columns)}); map yours with data.columns"
        )
    kept = {f: c for f, c in sources.items() if f in _fields_of(fmt, sources)}
    return Layout(fmt, kept, sharegpt, spec.prompt_template)


def _detect(sources: Mapping[str, list[str]], spec: DataSpec) -> str | None:
    if "messages" in sources:
        return "messages"
    if "label" in sources and ("choices" in sources or spec.choices) and "prompt" in sources:
        return "choices"
    if "prompt" in sources and "completion" in sources:
        return "prompt_completion"
    if "text" in sources:
        return "text"
    return None


def _fields_of(fmt: str, sources: Mapping[str, list[str]]) -> set[str]:
    return {
        "text": {"text"},
        "prompt_completion": {"prompt", "completion", "system"},
        "messages": {"messages", "prompt", "completion", "system"},
        "choices": {"prompt", "choices", "label"},
    }[fmt]


def _names(columns: Sequence[str]) -> str:
    return ", ".join(columns) if columns else "none"


# --------------------------------------------------------------------------------------------------- rows


def to_records(rows: Any, layout: Layout, spec: DataSpec, where: str) -> list[Record]:
    """Every row of ``rows`` (a ``datasets.Dataset`` or a list of dicts) as a :class:`Record`; the first bad
    row raises ``DataError`` naming ``where`` (the file), the row and the field."""
    records = []
    for index, row in enumerate(rows):
        try:
            records.append(_record(index + 1, row, layout, spec))
        except RowError as err:
            raise DataError(f"{where}: row {index + 1}: {err}") from None
    return records


def _record(number: int, row: Mapping[str, Any], layout: Layout, spec: DataSpec) -> Record:
    fmt = layout.format
    if fmt == "text":
        return Record(number, text=_text(row, layout, "text"))
    if fmt == "choices":
        return _choice_record(number, row, layout, spec)
    prompt_value = _raw(row, layout, "prompt") if "prompt" in layout.sources else None
    completion_value = _raw(row, layout, "completion") if "completion" in layout.sources else None
    if fmt == "messages" and "messages" in layout.sources:
        messages = _messages(_raw(row, layout, "messages"), "messages", layout.sharegpt)
        conversation = _conversation(
            messages, [m["role"] == "assistant" for m in messages], spec, row, layout
        )
        return Record(number, conversation=conversation)
    if isinstance(prompt_value, list) or isinstance(completion_value, list):  # TRL conversational pairs
        prompt_turns = _messages(prompt_value, "prompt", False) if prompt_value is not None else []
        completion_turns = _messages(completion_value, "completion", False)
        trained = [False] * len(prompt_turns) + [m["role"] == "assistant" for m in completion_turns]
        conversation = _conversation(prompt_turns + completion_turns, trained, spec, row, layout)
        return Record(number, conversation=conversation)
    prompt = _text(row, layout, "prompt", allow_empty=True)
    completion = _text(row, layout, "completion")
    if fmt == "messages":
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Record(number, conversation=_conversation(turns, [False, True], spec, row, layout))
    return Record(number, prompt=prompt, completion=completion)


def _raw(row: Mapping[str, Any], layout: Layout, field: str) -> Any:
    names = layout.sources[field]
    if names == ["<prompt_template>"]:
        return None
    if len(names) == 1:
        return row.get(names[0])
    parts = []
    for name in names:
        value = row.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise RowError(name, f"expected text, got {_kind(value)}")
        parts.append(value)
    return "\n\n".join(parts)


def _text(row: Mapping[str, Any], layout: Layout, field: str, *, allow_empty: bool = False) -> str:
    names = layout.sources[field]
    if names == ["<prompt_template>"]:
        return _fill_template(row, layout)
    value = _raw(row, layout, field)
    shown = names[0] if len(names) == 1 else "+".join(names)
    if value is None:
        raise RowError(shown, "missing")
    if not isinstance(value, str):
        raise RowError(shown, f"expected text, got {_kind(value)}")
    if not allow_empty and not value.strip():
        trained = field in ("text", "completion")
        raise RowError(shown, "empty" + (" (an example needs at least one trained token)" if trained else ""))
    return value


def _fill_template(row: Mapping[str, Any], layout: Layout) -> str:
    assert layout.template is not None
    values = {}
    for name in template_fields(layout.template):
        value = row.get(name)
        if value is None:
            raise RowError(name, "missing (data.prompt_template uses it)")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowError(name, f"expected text, got {_kind(value)}")
        values[name] = value
    return layout.template.format(**values)


def _choice_record(number: int, row: Mapping[str, Any], layout: Layout, spec: DataSpec) -> Record:
    prompt = _text(row, layout, "prompt")
    if spec.choices is not None and "choices" not in layout.sources:
        choices = tuple(spec.choices)
    else:
        choices = tuple(_string_list(_raw(row, layout, "choices"), layout.sources["choices"][0]))
    label_column = layout.sources["label"][0]
    label = row.get(label_column)
    if label is None:
        raise RowError(label_column, "missing")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RowError(label_column, f"expected a choice index or one of the choices, got {_kind(label)}")
    if isinstance(label, str):
        if label not in choices:
            raise RowError(label_column, f"{label!r} is not one of the choices {list(choices)}")
        index = choices.index(label)
    else:
        if not 0 <= label < len(choices):
            raise RowError(label_column, f"index {label} is out of range for {len(choices)} choices")
        index = label
    return Record(number, prompt=prompt, choices=choices, label=index)


def _string_list(value: Any, field: str) -> list[str]:
    if isinstance(value, str):  # a CSV cell may hold the list as JSON text
        value = _parse_json(value, field, default=value)
    if not isinstance(value, list) or len(value) < 2:
        raise RowError(field, f"expected a list of at least 2 choices, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RowError(f"{field}[{i}]", f"expected non-empty text, got {_kind(item)}")
    if len(set(value)) != len(value):
        raise RowError(field, "repeats a choice")
    return value


def _messages(value: Any, field: str, sharegpt: bool) -> list[dict[str, Any]]:
    if isinstance(value, str):  # a CSV cell may hold the list as JSON text
        value = _parse_json(value, field, default=value)
    if not isinstance(value, list) or not value:
        raise RowError(field, f"expected a non-empty list of {{role, content}} messages, got {_kind(value)}")
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise RowError(where, f"expected a {{role, content}} object, got {_kind(item)}")
        item = {k: v for k, v in item.items() if v is not None}  # Arrow fills absent keys with None
        if sharegpt:
            role_name, content = item.pop("from", None), item.pop("value", None)
            role = SHAREGPT_ROLES.get(role_name) if isinstance(role_name, str) else None
            if role is None:
                raise RowError(
                    f"{where}.from",
                    f"unknown role {role_name!r} (expected one of {', '.join(SHAREGPT_ROLES)})",
                )
            item = {"role": role, "content": content, **item}
        role = item.get("role")
        if not isinstance(role, str):
            raise RowError(f"{where}.role", f"missing or not text ({_kind(role)})")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = item.get("content")
        if content is None and not item.get("tool_calls"):
            raise RowError(f"{where}.content", "missing")
        if content is not None and not isinstance(content, str):
            raise RowError(f"{where}.content", f"expected text, got {_kind(content)}")
        if role == "assistant" and not (content or "").strip() and not item.get("tool_calls"):
            raise RowError(f"{where}.content", "empty assistant turn")
        messages.append(dict(item))
    return messages


def _conversation(
    messages: list[dict[str, Any]],
    trained: list[bool],
    spec: DataSpec,
    row: Mapping[str, Any],
    layout: Layout,
) -> Conversation:
    system = None
    if "system" in layout.sources:
        value = row.get(layout.sources["system"][0])
        if value is not None and not isinstance(value, str):
            raise RowError(layout.sources["system"][0], f"expected text, got {_kind(value)}")
        system = value or None
    system = system or spec.system_prompt
    if system and messages[0]["role"] != "system":
        messages, trained = [{"role": "system", "content": system}, *messages], [False, *trained]
    if not any(trained):
        raise RowError(
            layout.sources.get("messages", layout.sources.get("completion", ["messages"]))[0],
            "no assistant turn to learn from (an example needs at least one trained token)",
        )
    return Conversation(tuple(messages), tuple(trained))


def _parse_json(text: str, field: str, *, default: Any) -> Any:
    """``text`` parsed as JSON, or ``default`` when it is not JSON (the caller then names what it expected)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "text" if len(value) > 40 else f"text {value!r}"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return type(value).__name__
