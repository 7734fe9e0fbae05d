"""A conversation rendered with the model's own chat template, and which of its tokens are trained.

The token ids are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)`` (the template's text,
tokenized without adding special tokens, as transformers does). The trained tokens are those of the trained
assistant turns, end-of-turn marker included (the model must learn to stop), found by rendering the
conversation turn by turn: turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to
the end of ``render(messages[:i+1])``. That needs a template that renders a conversation as the sum of its
turns, which chat templates do (a template that rewrites earlier turns, e.g. one that drops past reasoning, is
refused with one line, as is a tokenizer without a chat template).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from chainlora.errors import DataError


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None, model: str) -> str:
    """The Jinja template to render with: ``override`` (its text, or a file holding it) or the model's own;
    one ``DataError`` line when there is none."""
    if override is not None:
        path = Path(override).expanduser()
        if "{" not in override and path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"data.chat_template {path}: cannot read it ({err})") from None
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError(
            f"model {model} has no chat template, which the messages format needs: give one with "
            "data.chat_template (a Jinja template or a file), or use the prompt_completion or text format"
        )
    return template


def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    template: str,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The template's text for ``messages`` (one ``DataError`` line if the template raises)."""
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:  # jinja2 TemplateError, or the template's own raise_exception(...)
        raise DataError(
            f"the chat template cannot render this conversation: {str(err).splitlines()[0]}"
        ) from None


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    trained: Sequence[bool],
    template: str,
) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and, per token, whether it belongs to a trained turn."""
    text = render_text(tokenizer, messages, template)
    spans = []
    for i, learn in enumerate(trained):
        if not learn:
            continue
        before = render_text(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = render_text(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                f"the chat template does not render the conversation as the sum of its turns (turn {i + 1} "
                "changes what comes before it), so its trained tokens cannot be located; give a template that "
                "does with data.chat_template"
            )
        spans.append((len(before), len(upto)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    flags = [
        any(start < end_span and end > start_span for start_span, end_span in spans)
        for start, end in encoding["offset_mapping"]
    ]
    return ids, flags


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user: str,
    template: str,
    *,
    system: str | None = None,
    max_tokens: int | None = None,
) -> tuple[str, bool]:
    """The template's text of a conversation ``[system?, user]`` ready for the assistant's reply
    (``add_generation_prompt``), and whether ``user`` was cut. With ``max_tokens``, a user text too long is cut
    from the left (``"..."`` + its last tokens) so that the whole prompt fits while the template's own parts (the
    system turn, the role markers) stay whole."""
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = render_text(tokenizer, turns, template, add_generation_prompt=True)
    if max_tokens is None or _count(tokenizer, text) <= max_tokens:
        return text, False
    marker = "\x00chainlora-user\x00"
    scaffold = render_text(
        tokenizer, [*turns[:-1], {"role": "user", "content": marker}], template, add_generation_prompt=True
    )
    head, _, tail = scaffold.partition(marker)
    room = max_tokens - _count(tokenizer, head) - _count(tokenizer, tail) - _count(tokenizer, "...")
    if room < 1:
        raise DataError(
            f"max_length {max_tokens}: no room left for the user turn (the chat template around it takes "
            f"{max_tokens - room} tokens)"
        )
    ids = tokenizer(user, add_special_tokens=False)["input_ids"]
    kept = "..." + tokenizer.decode(ids[len(ids) - room :]).lstrip()
    return render_text(
        tokenizer, [*turns[:-1], {"role": "user", "content": kept}], template, add_generation_prompt=True
    ), True


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
