"""``chainlora chat RUN_DIR``: talk to what you trained, in the terminal (``--prompt TEXT``: one answer).

The model is the run's merged ``final/`` (or, with ``--adapter``, or when ``final/`` is absent, the run's base
model with the whole chain loaded as a PEFT adapter from ``adapter/``); a model folder or a registry name works
too (0-shot). Turns are rendered with the model's chat template (``--chat_template`` to give another), the
answer is streamed token by token as it is generated, and the conversation so far is kept for the next turn.
Commands: ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) leaves with one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Thread
from typing import Any, TextIO

import torch

from chainlora.config import ChatConfig
from chainlora.errors import ConfigError

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def load_chat_model(config: ChatConfig) -> tuple[Any, Any, str]:
    """The model to talk to, its tokenizer, and a one-line description of what was loaded."""
    from chainlora import models
    from chainlora.rundir import ADAPTER_DIR, FINAL_DIR, load_run_config

    path = Path(config.run_dir).expanduser()
    final, adapter = path / FINAL_DIR, path / ADAPTER_DIR
    if path.is_dir() and (final.is_dir() or adapter.is_dir()):
        if config.adapter or not final.is_dir():
            if not adapter.is_dir():
                raise ConfigError(f"{path}: no {ADAPTER_DIR}/ to load (the run exported none)")
            from peft import PeftModel

            base = load_run_config(path).model
            model, tokenizer = models.load(base)
            model = PeftModel.from_pretrained(model, str(adapter))
            return model, tokenizer, f"{base} + {adapter}"
        model, tokenizer = models.load(final)
        return model, tokenizer, str(final)
    if config.adapter:
        raise ConfigError(f"--adapter: {path} is not a run folder with an {ADAPTER_DIR}/")
    model, tokenizer = models.load(config.run_dir)
    return model, tokenizer, f"{config.run_dir} (not fine-tuned here)"


class Conversation:
    """The turns so far and how to answer the next one (streamed)."""

    def __init__(self, model: Any, tokenizer: Any, config: ChatConfig, template: str) -> None:
        self.model, self.tokenizer, self.config, self.template = model, tokenizer, config, template
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.config.system}] if self.config.system else []

    def answer(self, text: str) -> Iterator[str]:
        """Add the user's turn, yield the answer's text piece by piece, then keep it as the assistant's turn."""
        from transformers import TextIteratorStreamer

        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(
            self.messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        inputs = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = self.config.temperature > 0
        kwargs = {
            **inputs,
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": sampling,
            "streamer": streamer,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if sampling:
            kwargs["temperature"] = float(self.config.temperature)
        torch.manual_seed(self.config.seed)
        failure: list[BaseException] = []
        thread = Thread(target=self._generate, args=(kwargs, streamer, failure), daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if failure:
            raise failure[0]
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    @torch.no_grad()
    def _generate(self, kwargs: dict[str, Any], streamer: Any, failure: list[BaseException]) -> None:
        """``generate`` on its own thread; an exception ends the stream (so the reader never waits forever)
        and is raised again by :meth:`answer`."""
        try:
            self.model.generate(**kwargs)
        except BaseException as err:  # handed to the main thread
            failure.append(err)
            streamer.end()


def chat_command(config: ChatConfig) -> int:
    """``chainlora chat``."""
    return chat(config)


def chat(
    config: ChatConfig,
    *,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Run the session (or answer ``config.prompt``); returns the exit code."""
    from chainlora.data.chat import resolve_chat_template

    out = out or sys.stdout
    model, tokenizer, what = load_chat_model(config)
    model.eval()
    template = resolve_chat_template(tokenizer, config.chat_template, what)
    conversation = Conversation(model, tokenizer, config, template)
    if config.prompt is not None:
        for piece in conversation.answer(config.prompt):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    if read is input and sys.stdin.isatty():
        import readline  # noqa: F401  line editing and history for input()

    out.write(f"chatting with {what}; /reset forgets the conversation, /exit or Ctrl-D leaves\n")
    out.flush()
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        text = text.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            conversation.reset()
            out.write("(conversation forgotten)\n")
            continue
        if not text:
            continue
        out.write("model> ")
        for piece in conversation.answer(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    out.write(f"bye: {len([m for m in conversation.messages if m['role'] == 'user'])} turn(s)\n")
    out.flush()
    return 0
