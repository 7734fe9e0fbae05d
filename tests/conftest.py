"""Shared fixtures: every test is seeded and uses tiny models built from configs (fp32, CPU, no download)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from chainlora.testing import tiny_causal_lm, tiny_model_dir, tiny_task_data, tiny_tokenizer

# Property tests draw the same examples on every run, so CI on main is reproducible; to search for new
# counterexamples run with HYPOTHESIS_PROFILE=explore (random draws) and pin what it finds with @example.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ../shared/data beside the checkout; $CHAINLORA_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(
    os.environ.get("CHAINLORA_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Forked runs (and the server they are forked from) use one thread: the machine is shared. A module asks for
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["llama", "opt"])
def tiny_model(request, tokenizer):
    """A fresh tiny random causal LM of each architecture (vocab matches the tiny tokenizer)."""
    return tiny_causal_lm(request.param, vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-opt"), "opt")


@pytest.fixture(scope="session")
def tiny_cb_data(tmp_path_factory) -> Path:
    """Made-up CB data (``chainlora.testing.tiny_task_data``), for tests that run without ``../shared``."""
    return tiny_task_data(tmp_path_factory.mktemp("tiny-cb"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real task copies beside the project (``../shared/data``); tests needing them skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer has a ChatML template, saved as a model folder."""
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), extra_tokens=["<|im_start|>", "<|im_end|>"])
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
