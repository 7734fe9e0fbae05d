"""TrainConfig validation (one error line naming the field) and every shipped YAML config parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainlora.cli import main
from chainlora.config import EvalConfig, TrainConfig, parse_config
from chainlora.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_follow_the_method():
    assert TrainConfig(method="cola").chain.length == 3
    assert TrainConfig(method="lora").chain.length == 1
    assert TrainConfig(method="cola").lr == 5e-4
    assert TrainConfig(method="full").lr == 1e-5
    assert TrainConfig(batch_size=4).eval_batch_size == 4


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"method": "qlora"}, "method"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"alpha": -1.0}}, "lora.alpha"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"target_modules": []}}, "lora.target_modules"),
        ({"lora": {"target_modules": "everything"}}, "lora.target_modules"),
        ({"lora": {"init": "zeros"}}, "lora.init"),
        ({"chain": {"knots": [0.5, 1.5]}}, "chain.knots"),
        ({"chain": {"knots": [4, 0.5]}}, "chain.knots"),
        ({"chain": {"knots": [8, 4]}}, "chain.knots"),
        ({"chain": {"length": 3, "knots": [4]}}, "chain.length"),
        ({"chain": {"ranks": [8, 4]}}, "chain.ranks"),  # default cola chain has 3 links
        ({"chain": {"length": 2, "ranks": [4, 2]}}, "chain.ranks"),  # first rank != lora.r
        ({"method": "lora", "chain": {"length": 2}}, "chain.length"),
        ({"method": "lora", "chain": {"knots": [3]}}, "chain.knots"),
        ({"method": "full", "chain": {"ranks": [8]}}, "chain.ranks"),
        ({"method": "lora", "lr_schedule": "jagged"}, "lr_schedule"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup": 2.5}, "warmup"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_train": 0}, "num_train"),
        ({"num_dev": 0}, "selection"),
        ({"seed": -1}, "seed"),
        ({"precision": "fp8"}, "precision"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"selection": "best"}, "selection"),
        ({"max_length": 4}, "max_length"),
        ({"task": ""}, "task"),
        ({"bogus": 1}, "bogus"),
        ({"lora": {"rank": 8}}, "lora.rank"),
    ],
)
def test_bad_field_is_named_in_one_line(overrides, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{field}:"), message


def test_cli_overrides_and_errors(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("task: rte\nmethod: cola\nchain:\n  length: 2\nlora:\n  r: 4\n")
    config = parse_config(
        TrainConfig, ["--config", str(yaml_file), "--lr", "1e-4", "--lora.r", "8"], prog="t"
    )
    assert (config.task, config.lr, config.lora.r, config.chain.length) == ("rte", 1e-4, 8, 2)
    assert main(["train", "--config", str(yaml_file), "--lora.r", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: lora.r: must be an integer >= 1, got 0"
    assert main(["train", "--no_such_field", "1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("task: rte\nlora:\n  rnk: 4\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rnk" in err and err.count("\n") == 1


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        if name not in ("lora", "chain"):
            assert f"--{name} " in text, name
    for name in (
        "lora.r",
        "lora.alpha",
        "lora.bias",
        "lora.rslora",
        "lora.init",
        "chain.knots",
        "chain.ranks",
    ):
        assert f"--{name} " in text, name
    assert "Rank of the LoRA link" in text  # field docstrings are the help


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    config = parse_config(TrainConfig, ["--config", str(path)], prog="chainlora train")
    assert config.method in ("lora", "cola", "full")
    assert TrainConfig.from_dict(config.to_dict()) == config  # what config.yaml holds round-trips


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert "quick_boolq_cola.yaml" in names
    assert any(n.startswith("lora_") for n in names) and any(n.startswith("full_") for n in names)


def test_eval_config_positional_model(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "chainlora.recipes.evaluate.evaluate_model", lambda c: seen.setdefault("c", c) and None
    )
    with pytest.raises((TypeError, AttributeError)):  # our stub returns None; we only check the parse
        main(["eval", "some/folder", "--task", "rte", "--num_eval", "5"])
    assert isinstance(seen["c"], EvalConfig)
    assert (seen["c"].model, seen["c"].task, seen["c"].num_eval) == ("some/folder", "rte", 5)


def test_lr_schedules_are_pure_functions_of_the_step():
    from chainlora.recipes.trainer import LinkLR

    linear = LinkLR("linear", total_steps=10)
    assert [linear(s) for s in (0, 5, 9)] == [1.0, 0.5, 0.1]
    jagged = LinkLR("jagged", total_steps=10, knots=(4,))  # links: steps 1-4 | 5-10
    assert [jagged(s) for s in (0, 3, 4, 9)] == [1.0, 0.25, 1.0, 1 / 6]
    warm = LinkLR("jagged", total_steps=10, warmup=0.5, knots=(4,))  # half of each link warms up
    assert [warm(s) for s in range(10)] == [0.0, 0.5, 1.0, 0.5, 0.0, 1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]
    constant = LinkLR("constant", total_steps=10, warmup=2)
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
