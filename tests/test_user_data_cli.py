"""Your own data through the command line, end to end on a tiny random chat model (no ``../shared`` needed):
every format trains and writes its metrics; ``chainlora compare`` pairs seeds and reports the paired difference
(checked against scipy); bad data is one ``error:`` line and exit 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from chainlora.cli import main
from chainlora.recipes.compare import Comparison, MethodRuns, compare_methods
from chainlora.recipes.stats import paired_difference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
SMALL = ["--epochs", "2", "--batch_size", "2", "--lr", "1e-3", "--precision", "fp32", "--zero_shot", "true"]


def train(model: Path, out: Path, *args: str) -> dict:
    code = main(["train", "--model", str(model), "--output_dir", str(out), *SMALL, *args])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("args", "fmt", "metric"),
    [
        (
            ["--data", str(EXAMPLES / "text.jsonl"), "--method", "cola", "--chain.length", "2"],
            "text",
            "perplexity",
        ),
        (
            ["--data", str(EXAMPLES / "prompt_completion.jsonl"), "--method", "lora"],
            "prompt_completion",
            "f1",
        ),
        (
            ["--data", str(EXAMPLES / "chat.jsonl"), "--method", "cola", "--chain.length", "2"],
            "messages",
            "f1",
        ),
        (
            ["--data", str(EXAMPLES / "alpaca.jsonl"), "--method", "cola", "--data.packing", "true"],
            "prompt_completion",
            "f1",
        ),
        (
            ["--data", str(EXAMPLES / "choices.jsonl"), "--method", "cola", "--chain.length", "2"],
            "choices",
            "accuracy",
        ),
        (
            [
                "--data",
                str(EXAMPLES / "reviews.jsonl"),
                "--method",
                "cola",
                "--chain.length",
                "2",
                "--data.prompt_template",
                "Review: {review}",
                "--data.columns",
                '{"label": "sentiment"}',
                "--data.choices",
                '["negative", "positive"]',
                "--data.chat",
                "true",
                "--max_length",
                "48",
            ],
            "choices",
            "accuracy",
        ),
    ],
    ids=["text", "prompt_completion", "messages", "alpaca_packed", "choices", "reviews_chat_template"],
)
def test_every_format_trains_end_to_end(chat_model, tmp_path, args, fmt, metric):
    metrics = train(chat_model, tmp_path / "run", *args, "--num_dev", "2", "--num_eval", "2")
    assert metrics["metric"] == metric
    assert metrics["data"]["format"] == fmt
    assert metrics["test_score"] is not None and metrics["zero_shot_test_score"] is not None
    assert metrics["data"]["splits"]["dev"]["examples"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    if metric == "f1":  # answers generated: samples written for a person to look at
        assert any((tmp_path / "run" / "samples").iterdir())


def test_chat_prompts_are_cut_inside_the_user_turn(chat_model, tmp_path):
    """With data.chat and a small max_length, the review is cut from the left; the template's parts survive."""
    from transformers import AutoTokenizer

    from chainlora.data.chat import chat_prompt

    tok = AutoTokenizer.from_pretrained(chat_model)
    template = tok.chat_template
    text, cut = chat_prompt(tok, "word " * 200, template, system="be brief", max_tokens=40)
    assert cut and text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n...")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 40
    same, cut = chat_prompt(tok, "short", template, max_tokens=40)
    assert not cut and same == tok.apply_chat_template(
        [{"role": "user", "content": "short"}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


def test_compare_pairs_seeds_and_states_a_verdict(chat_model, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--model",
        str(chat_model),
        "--data",
        str(EXAMPLES / "choices.jsonl"),
        "--seeds",
        "2",
        "--output_dir",
        str(out),
        "--num_dev",
        "2",
        "--zero_shot",
        "false",
        "--chain.length",
        "2",
        *SMALL[:-2],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert result["finished"] == {"lora": [0, 1], "cola": [0, 1]}
    first = result["comparisons"][0]
    assert first["metric"] == "accuracy" and first["method"] == "cola" and first["baseline"] == "lora"
    cola = [result["per_seed"]["cola"][s]["test_accuracy"] for s in ("0", "1")]
    lora = [result["per_seed"]["lora"][s]["test_accuracy"] for s in ("0", "1")]
    assert first["mean_difference"] == pytest.approx((cola[0] - lora[0] + cola[1] - lora[1]) / 2)
    assert first["verdict"] in printed and first["verdict"].startswith("COLA − LoRA = ")
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 0
    # the same seed gives both methods the same test rows
    runs = {
        m: json.loads(next((out).glob(f"*/{m}*/**/seed0/metrics.json")).read_text()) for m in ("lora", "cola")
    }
    assert runs["lora"]["data"]["splits"] == runs["cola"]["data"]["splits"]
    # run again: nothing is retrained, the same report comes back
    assert main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["per_seed"] == result["per_seed"]


def test_compare_statistics_equal_scipy():
    a = [0.71, 0.64, 0.80, 0.69, 0.75]
    b = [0.66, 0.65, 0.72, 0.70, 0.69]
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    ci = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert (d.low, d.high) == pytest.approx(ci, rel=1e-12)
    assert d.pvalue == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert (d.wins, d.losses, d.ties) == (3, 2, 0)
    runs = {
        "lora": MethodRuns("lora", "LoRA", {i: {"test_accuracy": v} for i, v in enumerate(b)}),
        "cola": MethodRuns("cola", "COLA", {i: {"test_accuracy": v} for i, v in enumerate(a)}),
    }
    [comparison], metrics = compare_methods(runs, "lora", "accuracy")
    assert metrics == ["test_accuracy"]
    assert comparison.verdict() == (
        f"COLA − LoRA = +{d.mean * 100:.1f} accuracy points (95% CI {ci[0] * 100:+.1f}..{ci[1] * 100:+.1f}, "
        f"5 seeds, p = {d.pvalue:.2g}): not distinguishable"
    )


def test_a_clear_loss_difference_names_the_better_method():
    """Lower is better for perplexity: a negative difference whose CI excludes 0 favours the method."""
    from chainlora.recipes.stats import PairedDifference

    d = PairedDifference(5, -2.0, -3.0, -1.0, 0.004, 0, 5, 0, 0.8)
    comparison = Comparison("cola", "lora", "perplexity", [0, 1, 2, 3, 4], d, 1.0)
    assert comparison.verdict().endswith(": COLA is better here")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--methods", '["lora"]'], "methods: must list at least two"),
        (["--methods", '["lora", "qlora"]'], "unknown method 'qlora'"),
        (["--baseline", "full"], "baseline: 'full' is not one of methods"),
        (["--seeds", "0"], "seeds"),
        (["--lrs", '{"full": 1e-5}'], "lrs: 'full' is not one of methods"),
    ],
)
def test_bad_compare_options_are_one_line(chat_model, tmp_path, capsys, argv, expected):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--model",
            str(chat_model),
            "--data",
            str(EXAMPLES / "choices.jsonl"),
            "--output_dir",
            str(out),
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0]
    assert not out.exists()


def test_a_chain_that_prunes_its_optimizer_state_records_what_each_knot_zeroed(chat_model, tmp_path, caplog):
    """``--chain.optimizer_reset 0.9`` (ReLoRA's pruning) on your own data: every knot zeroes 90% of the links'
    optimizer state, and metrics.json says so per knot; the paper's default clears it all (1.0)."""
    text = ["--data", str(EXAMPLES / "text.jsonl"), "--method", "cola", "--chain.length", "3"]
    pruned = train(chat_model, tmp_path / "pruned", *text, "--chain.optimizer_reset", "0.9")
    zeroed = [k["optimizer_state_zeroed"] for k in pruned["knots"]]
    assert len(zeroed) == 2 and all(0.89 < z < 0.91 for z in zeroed), zeroed
    # pruned moments with the step count kept and no warmup after a knot: the user is warned, once
    warned = [r.getMessage() for r in caplog.records if "chain.optimizer_reset 0.9 keeps" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("warning: ")
    caplog.clear()
    train(chat_model, tmp_path / "relora", *text, "--chain.optimizer_reset", "0.9", "--lr_schedule", "jagged",
          "--warmup", "0.25")  # fmt: skip
    assert not [r for r in caplog.records if "chain.optimizer_reset" in r.getMessage()]  # ReLoRA's recipe
    paper = train(chat_model, tmp_path / "paper", *text)
    assert [k["optimizer_state_zeroed"] for k in paper["knots"]] == [1.0, 1.0]
    assert paper["train_loss"][-1] != pruned["train_loss"][-1]  # another run from the first knot on


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--chain.optimizer_reset", "1.5"], "chain.optimizer_reset: must be >= 0.0 and <= 1.0, got 1.5"),
        (["--chain.optimizer_reset", "lots"], "chain.optimizer_reset"),
        (["--method", "lora", "--chain.optimizer_reset", "0.5"], "chain.optimizer_reset: acts at knots"),
        (
            ["--chain.length", "2", "--chain.ranks", "[8, 4]", "--chain.optimizer_reset", "0"],
            "which a rank change cannot",
        ),
        (
            ["--chain.knots", "auto", "--chain.auto.rank_rule", "halve", "--chain.optimizer_reset", "0.9"],
            "which a rank change cannot",
        ),
    ],
)
def test_an_optimizer_reset_that_cannot_apply_is_one_line(chat_model, tmp_path, capsys, argv, expected):
    out = tmp_path / "run"
    argv = ["--method", "cola", *argv]  # a later --method wins
    code = main(
        [
            "train",
            "--model",
            str(chat_model),
            "--data",
            str(EXAMPLES / "text.jsonl"),
            "--output_dir",
            str(out),
            *argv,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not out.exists()


def test_bad_data_for_compare_is_refused_before_any_run(chat_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(chat_model), "--data", str(bad), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl: row 2" in err[0] and "completion" in err[0]
    assert not out.exists()


def test_data_chat_on_non_choices_data_is_one_line(chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(chat_model),
            "--data",
            str(EXAMPLES / "prompt_completion.jsonl"),
            "--data.chat",
            "true",
            "--output_dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.chat: applies to choices data" in err[0]
    assert not out.exists()


def test_data_in_an_installed_package_is_found_by_pkg_path(tmp_path):
    from chainlora.data.files import resolve_path
    from chainlora.errors import DataError

    found = resolve_path("pkg:chainlora/data/__init__.py")
    assert found.is_file() and found.parent.name == "data"
    with pytest.raises(DataError, match=r"no nowhere\.csv inside an installed package .chainlora."):
        resolve_path("pkg:chainlora/nowhere.csv")
    with pytest.raises(DataError, match="write pkg:PACKAGE/path"):
        resolve_path("pkg:chainlora")


def test_chat_with_a_trained_run_merged_or_as_adapter_answers_the_same(chat_model, tmp_path, capsys):
    run = tmp_path / "run"
    train(
        chat_model,
        run,
        "--data",
        str(EXAMPLES / "chat.jsonl"),
        "--method",
        "cola",
        "--chain.length",
        "2",
        "--num_dev",
        "2",
        "--zero_shot",
        "false",
    )
    capsys.readouterr()
    answers = []
    for extra in ([], ["--adapter", "true"]):
        assert main(["chat", str(run), "--prompt", "What is COLA?", "--max_new_tokens", "8", *extra]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and len(answers[0]) > 1  # greedy: the same tokens either way


@pytest.mark.parametrize("data", ["choices.jsonl", "prompt_completion.jsonl"])
def test_eval_on_your_data_reproduces_the_runs_test_score(chat_model, tmp_path, capsys, data):
    run = tmp_path / "run"
    sizes = ["--num_dev", "2", "--num_eval", "3", "--seed", "1"]
    metrics = train(chat_model, run, "--data", str(EXAMPLES / data), "--method", "lora", *sizes)
    out = tmp_path / "eval.json"
    code = main(["eval", str(run / "final"), "--data", str(EXAMPLES / data), *sizes, "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_examples"] == 3 and result["metric"] == metrics["metric"]
    assert result["score"] == pytest.approx(metrics["test_score"], abs=1e-6)
    assert f"{result['metric']}: {result['score']:.4f}" in capsys.readouterr().out
    # a run's final/ alone: scored as the run scored it (its data, seed, sizes and precision)
    assert main(["eval", str(run / "final"), "--output", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["score"] == result["score"] and again["precision"] == metrics["test_precision"] == "fp32"


def test_eval_without_task_or_data_is_one_line(capsys):
    code = main(["eval", "some/folder"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--task" in err[0] and "--data FILE" in err[0]


def test_learning_rates_are_chosen_by_dev_loss_or_lowest_perplexity_where_there_is_no_higher_score():
    from chainlora.recipes.results import RunResult, select_learning_rates

    def run(lr, seed, **metrics):
        return RunResult(
            f"d/lora/lr{lr}/s{seed}",
            "d",
            "lora",
            1,
            None,
            None,
            lr,
            seed,
            (),
            dev_score=metrics.get("dev_score"),
            test_score=None,
            dev_loss=metrics.get("dev_loss"),
            metrics={"metric": metrics.get("metric", "f1")},
        )

    by_loss = [run(1e-3, 0, dev_loss=2.0), run(1e-4, 0, dev_loss=1.5)]
    assert next(iter(select_learning_rates(by_loss).values())).chosen_lr == 1e-4
    by_perplexity = [
        run(1e-3, 0, dev_score=9.0, metric="perplexity"),
        run(1e-4, 0, dev_score=12.0, metric="perplexity"),
    ]
    assert next(iter(select_learning_rates(by_perplexity).values())).chosen_lr == 1e-3
    by_f1 = [run(1e-3, 0, dev_score=0.3, dev_loss=1.0), run(1e-4, 0, dev_score=0.5, dev_loss=2.0)]
    assert next(iter(select_learning_rates(by_f1).values())).chosen_lr == 1e-4
