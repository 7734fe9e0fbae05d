"""``chainlora train`` end to end on a tiny model and real task data: every method, resume, and bad input."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from chainlora import tasks
from chainlora.cli import main
from chainlora.config import TrainConfig, parse_config
from chainlora.recipes.train import train
from chainlora.rundir import load_run_config

TASK = "rte"  # real data, small enough to read in a blink
SMALL = ["--num_train", "16", "--num_dev", "8", "--num_eval", "8", "--batch_size", "4", "--epochs", "2"]


def run_cli(*args: str) -> int:
    return main(["train", *args])


def common(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--task",
        TASK,
        "--data",
        str(data / TASK),
        "--output_dir",
        str(out),
        *SMALL,
    ]


def rescore_final(run_dir: Path, data: Path) -> float:
    """Load final/ with plain transformers and score the run's test draw (seed 0, 8 examples)."""
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    task = tasks.get_task(TASK)
    test = tasks.load_task_data(task, data=data / TASK).sample(0, num_train=0, num_dev=0, num_eval=8).test
    return tasks.evaluate(model, tokenizer, task, test, batch_size=4)["score"]


# One run per method; cola's (a knot, a rank step-down, a checkpoint every 3 steps) is also the uninterrupted
# reference of the resume test, so it runs once.
EXTRA = {
    # fp32: the adapter on the original fp32 base is compared with final/ to 1e-5 (bf16 runs: test_speed_defaults)
    "lora": ["--selection", "dev_score", "--zero_shot", "false", "--precision", "fp32"],
    "cola": [
        *["--chain.length", "2", "--chain.ranks", "[8, 4]", "--save_steps", "3", "--selection", "last"],
        *["--precision", "fp32"],
    ],
    "full": ["--lr", "1e-3", "--zero_shot", "false"],
}
COLA_RESUMABLE = [*EXTRA["cola"], "--lr", "1e-2"]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, shared_data, tmp_path_factory):
    """``trained(method)`` -> (run dir, printed summary) of that method's run, trained once per module."""
    done: dict[str, tuple[Path, str]] = {}

    def get(method: str) -> tuple[Path, str]:
        if method not in done:
            out = tmp_path_factory.mktemp(method) / "run"
            extra = COLA_RESUMABLE if method == "cola" else EXTRA[method]
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert run_cli(*common(tiny_llama_dir, shared_data, out), "--method", method, *extra) == 0
            done[method] = out, printed.getvalue()
        return done[method]

    return get


@pytest.mark.parametrize("method", ["lora", "cola", "full"])
def test_each_method_end_to_end(method, trained, tiny_llama_dir, shared_data):
    out, printed = trained(method)
    assert "fine-tuned test accuracy" in printed
    assert ("0-shot" in printed) == (method == "cola")

    for name in ("config.yaml", "metrics.json", "loss.png", "final/config.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    assert not (out / "checkpoints").exists() and not (out / "best").exists()  # cleaned up after success
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"], metrics["method"], metrics["seed"]) == ("rte", method, 0)
    assert metrics["train_steps"] == 8 and len(metrics["train_loss"]) == 8
    assert metrics["train_flops"] > 0 and metrics["train_seconds"] > 0
    assert 0 <= metrics["test_score"] <= 1
    assert (metrics["zero_shot_test_score"] is not None) == (method == "cola")
    assert [h["step"] for h in metrics["dev_history"]] == [4, 8]
    assert load_run_config(out).method == method

    if method == "cola":
        assert [(k["step"], k["link"], k["next_rank"]) for k in metrics["knots"]] == [(4, 1, 4)]
        assert metrics["knots"][0]["delta_norm"] > 0
        assert metrics["selected_step"] == 8  # selection: last
    else:
        assert metrics["knots"] == []
    if method == "lora":  # selection: dev_score, the first best wins ties
        best = max(metrics["dev_history"], key=lambda h: h["dev_score"])
        assert metrics["selected_step"] == best["step"]
    if method == "full":  # selection: dev_loss (the harness default)
        best = min(metrics["dev_history"], key=lambda h: h["dev_loss"])
        assert metrics["selected_step"] == best["step"]
    if method != "full":  # the whole chain as one PEFT adapter on the ORIGINAL base == the merged final/
        assert metrics["adapter_bytes"] == metrics["adapter"]["bytes"] > 0
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129]])
        with torch.no_grad():
            assert (adapted(ids).logits - final(ids).logits).abs().max() <= 1e-5
    else:
        assert not (out / "adapter").exists()
    # final/ is a plain HF model (no LoRA modules left) that scores exactly what the run reported
    weights = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in key for key in weights)
    assert rescore_final(out, shared_data) == metrics["test_score"]


class Interrupt(TrainerCallback):
    """Simulates a crash right after optimizer step ``at``."""

    class Stop(Exception):
        pass

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise Interrupt.Stop


def test_resume_mid_chain_matches_uninterrupted(trained, tiny_llama_dir, shared_data, tmp_path):
    whole_dir, _ = trained("cola")  # the same config, uninterrupted
    cut = tmp_path / "cut"
    args = [*common(tiny_llama_dir, shared_data, cut), "--method", "cola", *COLA_RESUMABLE]
    config = parse_config(TrainConfig, args, prog="test")
    with pytest.raises(Interrupt.Stop):
        train(config, callbacks=[Interrupt(at=7)])  # after the knot at 4 and the checkpoint at 6
    assert not (cut / "metrics.json").exists()
    assert (cut / "checkpoints" / "checkpoint-6").is_dir()
    assert run_cli("--output_dir", str(cut), *SMALL[:2]) == 2  # refuses to start over a run by accident

    assert run_cli("--resume", str(cut)) == 0
    whole, resumed = (json.loads((d / "metrics.json").read_text()) for d in (whole_dir, cut))
    assert resumed["resumed_from"].endswith("checkpoint-6")
    assert resumed["knots"] == whole["knots"]
    assert resumed["dev_history"] == whole["dev_history"]
    assert resumed["train_flops"] == whole["train_flops"]
    assert resumed["test_score"] == whole["test_score"]
    a, b = (load_file(d / "final" / "model.safetensors") for d in (whole_dir, cut))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    assert run_cli("--resume", str(cut)) == 0  # a finished run: reports, trains nothing


def _bad_rows(tmp_path: Path) -> Path:
    folder = tmp_path / "rte_bad"
    folder.mkdir()
    row = {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "idx": 0, "label": 1}
    rows = [row] * 30 + [{k: v for k, v in row.items() if k != "hypothesis"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text(json.dumps(row) + "\n")
    return folder


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "nosuch"], "nosuch"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--chain.knots", "[100]"], "chain.knots"),
        (["--chain.length", "9"], "chain.length"),
        (["--chain.length", "2", "--chain.ranks", "[8, 4, 2]"], "chain.ranks"),
        (["--lora.target_modules", "[qq_proj]"], "lora.target_modules"),
        (["--method", "lora", "--chain.length", "2"], "chain.length"),
        (["--data", "{bad_rows}"], "hypothesis"),
        (["--output_dir", "{file}/run"], "output_dir"),
    ],
)
def test_bad_input_is_one_line_before_anything_is_written(
    args, expected, tiny_llama_dir, shared_data, tmp_path, capsys
):
    (tmp_path / "file").write_text("not a folder")
    replace = {
        "{bad_rows}": str(_bad_rows(tmp_path)) if "{bad_rows}" in args else "",
        "{file}": str(tmp_path / "file"),
    }
    args = [next((a.replace(k, v) for k, v in replace.items() if k in a), a) for a in args]
    out = tmp_path / "run"
    base = common(tiny_llama_dir, shared_data, out)
    assert run_cli(*base, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then exactly one error line
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and expected in err[-1], err
    assert not out.exists()


def test_output_dir_holding_another_run_is_refused(tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: rte\n")
    (out / "keep.txt").write_text("x")
    assert run_cli(*common(tiny_llama_dir, shared_data, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert run_cli(*common(tiny_llama_dir, shared_data, tmp_path / "other"), "--overwrite") == 2
    assert "holds no chainlora run" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").is_file()


def test_resume_refuses_a_changed_config(tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = common(tiny_llama_dir, shared_data, out)
    saved = parse_config(TrainConfig, config, prog="test").to_dict()
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_cli("--resume", str(out), "--lr", "0.1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lr: 0.1 differs")


def test_auto_knots_end_to_end(tiny_llama_dir, shared_data, tmp_path):
    """knots: auto — decisions recorded with their reason, never more links than chain.length, and the whole
    chain still exports as one adapter."""
    out = tmp_path / "auto"
    args = [*common(tiny_llama_dir, shared_data, out), "--method", "cola", "--chain.knots", "auto"]
    args += ["--chain.length", "3", "--chain.auto.min_link_steps", "2", "--chain.auto.patience", "1"]
    args += ["--chain.auto.threshold", "0.5", "--chain.auto.rank_rule", "halve", "--zero_shot", "false"]
    assert run_cli(*args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    knots = metrics["knots"]
    assert 1 <= len(knots) <= 2  # a threshold of 50% per step stops every link as soon as it may
    steps = [0] + [k["step"] for k in knots] + [metrics["train_steps"]]
    assert all(b - a >= 2 for a, b in itertools.pairwise(steps))  # min_link_steps
    assert metrics["ranks"] == [8, 4, 2][: len(knots) + 1]
    assert [d["step"] for d in metrics["knot_decisions"]] == [k["step"] for k in knots]
    assert all(d["reason"] for d in metrics["knot_decisions"])
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_auto_knots_need_every_step_logged(tiny_llama_dir, shared_data, tmp_path, capsys):
    args = [
        *common(tiny_llama_dir, shared_data, tmp_path / "x"),
        "--chain.knots",
        "auto",
        "--logging_steps",
        "2",
    ]
    assert run_cli(*args) == 2
    assert "logging_steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_rank_reports_error_and_scores_before_after(tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "cola"
    args = [*common(tiny_llama_dir, shared_data, out), "--method", "cola", "--chain.length", "2"]
    assert run_cli(*args, "--zero_shot", "false", "--epochs", "1") == 0
    capsys.readouterr()
    assert main(["export", str(out), "--adapter", "--rank", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["test_score"]) == {"full", "rank 4"}
    assert all(0 <= s <= 1 for s in report["test_score"].values())
    assert (out / "adapter-r4" / "adapter_config.json").is_file()
    assert 0 < report["max_relative_error"] < 1  # rank 4 of a rank-16 chain drops something, not everything
