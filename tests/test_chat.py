"""``chainlora chat``: one answer with ``--prompt``, and a multi-turn session driven in a real terminal (tmux),
on a tiny random chat model (the words are noise; what is checked is the session: prompts, streaming, history,
/reset, the exit line)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from chainlora.cli import main
from chainlora.config import ChatConfig
from chainlora.recipes.chat import chat


def test_one_prompt_is_answered_and_greedy_is_deterministic(chat_model, capsys):
    args = ["chat", str(chat_model), "--prompt", "hello there", "--max_new_tokens", "6"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.endswith("\n")


def test_the_session_keeps_history_and_reset_forgets_it(chat_model):
    inputs = iter(["first question", "second question", "/reset", "third", "/exit"])
    out = io.StringIO()
    config = ChatConfig(run_dir=str(chat_model), max_new_tokens=4, system="be brief")
    seen: list[list[dict]] = []
    import chainlora.recipes.chat as chat_module

    real = chat_module.Conversation.answer

    def spy(self, text):
        yield from real(self, text)
        seen.append([dict(m) for m in self.messages])

    chat_module.Conversation.answer = spy
    try:
        assert chat(config, read=lambda prompt: next(inputs), out=out) == 0
    finally:
        chat_module.Conversation.answer = real
    roles = [[m["role"] for m in turn] for turn in seen]
    assert roles[0] == ["system", "user", "assistant"]
    assert roles[1] == ["system", "user", "assistant", "user", "assistant"]  # history kept
    assert roles[2] == ["system", "user", "assistant"]  # /reset forgot it, the system message stays
    text = out.getvalue()
    assert "(conversation forgotten)" in text and text.rstrip().endswith("bye: 1 turn(s)")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--adapter", "true"], "--adapter"),
    ],
)
def test_bad_chat_options_are_one_line(chat_model, capsys, args, expected):
    code = main(["chat", str(chat_model), "--prompt", "hi", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0]


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def _wait_for(session: str, predicate, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.3)
    raise AssertionError(f"timed out; the terminal shows:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_real_terminal_session(chat_model, tmp_path):
    """Typed into a tmux pane: a banner, an answer per turn after `model> `, Ctrl-D leaves with the bye line."""
    session = f"chainlora-chat-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = f"{sys.executable} -m chainlora chat {chat_model} --max_new_tokens 5; echo EXITED=$?; sleep 30"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command],
        check=True,
        env=env,
    )
    try:
        _wait_for(session, lambda s: "chatting with" in s and "you> " in s)
        _tmux("send-keys", "-t", session, "what is a knot?", "Enter")
        _wait_for(session, lambda s: s.count("you> ") >= 2 and "model> " in s)
        _tmux("send-keys", "-t", session, "and a chain?", "Enter")
        _wait_for(session, lambda s: s.count("you> ") >= 3 and s.count("model> ") >= 2)
        _tmux("send-keys", "-t", session, "C-d")
        screen = _wait_for(session, lambda s: "EXITED=" in s)
        assert "bye: 2 turn(s)" in screen and "EXITED=0" in screen
        assert "Traceback" not in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
