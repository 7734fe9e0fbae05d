"""Adaptive knots: as good as the best even schedule on the synthetic higher-rank target, always within their
bounds whatever the losses, and the same decisions after a resume (state round trip and through the Trainer)."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

from chainlora import ChainOfLoRACallback, ChainSchedule, tie_knot
from chainlora.callback import SCHEDULE_STATE_FILE
from chainlora.errors import ConfigError
from chainlora.links import lora_layers
from chainlora.schedules import AutoChainSchedule
from chainlora.testing import tiny_chain_trainer

# ------------------------------------------------------------------------ synthetic higher-rank regression


def fit_regression(schedule, steps: int = 400, d: int = 32, target_rank: int = 24) -> float:
    """The Frank-Wolfe setup of test_chain.py (rank-4 links, Adam, full batch) on a rank-24 target: 4 links
    can fit at most rank 16, so the loss has a non-zero floor and "no worse than even" is not trivially met
    near zero. Returns the final loss."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(d, d, bias=False))
    w0 = model.lin.weight.detach().clone()
    u = torch.linalg.qr(torch.randn(d, target_rank))[0]
    v = torch.linalg.qr(torch.randn(d, target_rank))[0]
    target = u @ torch.diag(torch.linspace(1.0, 0.5, target_rank)) @ v.T
    x = torch.randn(256, d)
    y = x @ (w0 + target).T
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, steps + 1):
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(schedule, "observe"):
            schedule.observe(step, loss.item())
        if schedule.knot_due(step):
            tie_knot(model, optimizer)
    with torch.no_grad():
        return float((model(x) - y).square().mean())


def test_auto_knots_match_the_best_even_schedule_on_a_higher_rank_target():
    steps, max_links = 400, 4
    auto = ChainSchedule.auto(steps, max_links=max_links, min_link_steps=40, patience=20, threshold=0.01)
    auto_loss = fit_regression(auto)
    links = auto.chain_length
    # the even schedules with the same steps and as many links (the auto chain's, and the most allowed)
    even = {n: fit_regression(ChainSchedule.even(n, steps)) for n in sorted({links, max_links})}
    assert auto_loss <= 1.1 * min(even.values()), (auto.knots, auto_loss, even)
    assert len(auto.decisions) == len(auto.knots) == links - 1 >= 1
    for decision in auto.decisions:
        assert decision.signal == "loss" and decision.relative_improvement < 0.01
        assert decision.step - decision.reference_step >= 20 and f"step {decision.step}" in decision.reason


# ----------------------------------------------------------------------------------- bounds, any losses


@st.composite
def losses(draw) -> list[float]:
    """A loss curve of 10-150 steps: noisy decay, plateaus, spikes, a few NaNs (skipped by the schedule)."""
    n = draw(st.integers(10, 150))
    shape = draw(st.sampled_from(["noise", "decay", "steps"]))
    noise = draw(st.lists(st.floats(-0.5, 0.5), min_size=n, max_size=n))
    if shape == "noise":
        curve = [3.0 + e for e in noise]
    elif shape == "decay":
        rate = draw(st.floats(0.0, 0.2))
        curve = [1.0 + 2.0 * math.exp(-rate * i) + 0.05 * e for i, e in enumerate(noise)]
    else:  # plateaus with drops
        width = draw(st.integers(3, 40))
        curve = [2.0 / (1 + i // width) + 0.01 * e for i, e in enumerate(noise)]
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        curve[i] = draw(st.sampled_from([float("nan"), 100.0, 0.0]))
    return curve


settings_ = st.fixed_dictionaries(
    {
        "max_links": st.integers(1, 6),
        "min_link_steps": st.integers(1, 20),
        "patience": st.integers(1, 10),
        "threshold": st.floats(0.0, 0.3),
        "ema": st.floats(0.0, 0.95),
        "signal": st.sampled_from(["loss", "dev", "either"]),
    }
)


def run_schedule(schedule: AutoChainSchedule, losses: list[float], start: int = 1, stop: int | None = None):
    """Feed losses (and a dev score every 7 steps) from step ``start``; returns the steps with a knot."""
    knots = []
    for step in range(start, (len(losses) if stop is None else stop) + 1):
        schedule.observe(step, losses[step - 1])
        if step % 7 == 0:
            schedule.observe_dev(step, -losses[step - 1] if math.isfinite(losses[step - 1]) else 0.0)
        if schedule.knot_due(step, losses[step - 1]):
            knots.append(step)
    return knots


@settings(max_examples=200, deadline=None)
@given(losses=losses(), config=settings_)
def test_knots_never_closer_than_min_link_steps_nor_more_links_than_max(losses, config):
    total = len(losses)
    schedule = AutoChainSchedule(total, **config)
    knots = run_schedule(schedule, losses)
    assert knots == schedule.knots
    assert len(knots) + 1 <= config["max_links"]
    if knots:  # every link, the first and the last included, trains at least min_link_steps steps
        bounds = [0, *knots, total]
        assert all(b - a >= config["min_link_steps"] for a, b in itertools.pairwise(bounds)), bounds
    assert [d.step for d in schedule.decisions] == knots
    assert [d.link for d in schedule.decisions] == list(range(1, len(knots) + 1))


@settings(max_examples=100, deadline=None)
@given(losses=losses(), config=settings_, split=st.floats(0.0, 1.0))
def test_same_decisions_after_a_state_dict_round_trip_mid_run(losses, config, split):
    total = len(losses)
    uninterrupted = AutoChainSchedule(total, **config)
    run_schedule(uninterrupted, losses)
    first = AutoChainSchedule(total, **config)
    cut = int(split * total)
    run_schedule(first, losses, stop=cut)
    resumed = AutoChainSchedule(total, **config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as in a checkpoint
    run_schedule(resumed, losses, start=cut + 1)
    assert resumed.knots == uninterrupted.knots
    assert resumed.decisions == uninterrupted.decisions


# --------------------------------------------------------------------------------------- unit behaviour


def test_knot_when_the_smoothed_loss_stalls_and_not_while_it_improves():
    schedule = AutoChainSchedule(100, max_links=3, min_link_steps=5, patience=4, threshold=0.01, ema=0.0)
    for step in range(1, 21):  # 10 % better every step: no knot
        schedule.observe(step, 0.9**step)
        assert not schedule.knot_due(step)
    for step in range(21, 25):  # then flat from step 20 on: 0 % over the 4-step window at step 24
        schedule.observe(step, 0.9**20)
        assert schedule.knot_due(step) == (step == 24)
    decision = schedule.decisions[0]
    assert decision.reference_step == 20 and decision.relative_improvement == 0.0 and decision.link == 1
    assert schedule.knots == [24] and schedule.link_start == 24


def test_dev_signal_ties_a_knot_after_dev_patience_stale_evaluations():
    schedule = AutoChainSchedule(100, max_links=2, min_link_steps=5, patience=5, threshold=0.0, signal="dev")
    for step, accuracy in ((10, 0.5), (20, 0.6), (30, 0.6)):
        schedule.observe(step, 1.0)
        schedule.observe_dev(step, accuracy)
        due = schedule.knot_due(step)
    assert due and schedule.knots == [30] and schedule.decisions[0].signal == "dev"
    assert schedule.decisions[0].dev_score == 0.6
    # the dev loss works too (smaller is better)
    loss_based = AutoChainSchedule(
        100, max_links=2, min_link_steps=5, patience=5, threshold=0.0, signal="dev"
    )
    loss_based.observe_dev(10, 2.0, higher_is_better=False)
    loss_based.observe_dev(20, 1.5, higher_is_better=False)
    assert not loss_based.knot_due(20)


def test_callback_feeds_the_dev_metric_and_validates_logging(tmp_path):
    schedule = AutoChainSchedule(100, max_links=2, min_link_steps=5, patience=5, threshold=0.0, signal="dev")
    callback = ChainOfLoRACallback(schedule)
    args = SimpleNamespace(metric_for_best_model="accuracy", greater_is_better=True)
    for step, accuracy in ((10, 0.7), (20, 0.6)):
        callback.on_evaluate(
            args, SimpleNamespace(global_step=step), None, metrics={"eval_accuracy": accuracy}
        )
    assert schedule.knot_due(20)
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=5, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="logging_steps=1"):
        callback.on_train_begin(args, SimpleNamespace(max_steps=100, global_step=0), None)


def test_rank_rules():
    auto = ChainSchedule.auto
    common = {"max_links": 4, "min_link_steps": 1, "patience": 1, "threshold": 0.0}
    assert [auto(10, **common).rank_of_link(i) for i in (1, 2, 3)] == [None, None, None]
    assert [auto(10, **common, rank=8).rank_of_link(i) for i in (1, 4)] == [8, 8]
    halve = auto(10, **common, ranks="halve", rank=8, min_rank=2)
    assert [halve.rank_of_link(i) for i in (1, 2, 3, 4)] == [8, 4, 2, 2]
    explicit = auto(10, **common, ranks=[8, 6, 4, 2])
    assert [explicit.rank_of_link(i) for i in (1, 2, 3, 4)] == [8, 6, 4, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_links": 0}, "max_links"),
        ({"min_link_steps": 0}, "min_link_steps"),
        ({"patience": 0}, "patience"),
        ({"threshold": -0.1}, "threshold"),
        ({"ema": 1.0}, "ema"),
        ({"ranks": "halve"}, "rank="),
        ({"ranks": [8, 4]}, "one per link"),
        ({"ranks": "quarter"}, "'halve'"),
        ({"signal": "grad"}, "signal"),
    ],
)
def test_settings_are_validated_and_the_error_names_the_value(kwargs, message):
    config = {"max_links": 3, "min_link_steps": 5, "patience": 5, "threshold": 0.01, **kwargs}
    with pytest.raises(ConfigError, match=message):
        AutoChainSchedule(100, **config)


def test_state_saved_with_other_settings_is_refused():
    state = AutoChainSchedule(100, max_links=3, min_link_steps=5, patience=5, threshold=0.01).state_dict()
    other = AutoChainSchedule(100, max_links=3, min_link_steps=5, patience=5, threshold=0.02)
    with pytest.raises(ConfigError, match="threshold"):
        other.load_state_dict(state)


def test_observe_can_average_the_loss_over_processes(tmp_path):
    import torch.distributed as dist

    schedule = AutoChainSchedule(10, max_links=2, min_link_steps=1, patience=1, threshold=0.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        schedule.observe(1, 0.25, reduce=True)
    finally:
        dist.destroy_process_group()
    assert schedule.state_dict()["smoothed"] == 0.25


# ------------------------------------------------------------------------------ through the HF Trainer

TOTAL_STEPS = 12


def make_trainer(output_dir) -> tuple[Trainer, AutoChainSchedule]:
    schedule = AutoChainSchedule(
        TOTAL_STEPS,
        max_links=3,
        min_link_steps=2,
        patience=2,
        threshold=0.002,
        ema=0.5,
        ranks="halve",
        rank=8,
    )
    trainer, _ = tiny_chain_trainer(output_dir, schedule, arch="opt", save_steps=4)
    return trainer, schedule


def test_trainer_run_resumed_before_its_auto_knot_makes_the_same_decisions(tmp_path):
    trainer, schedule = make_trainer(tmp_path / "run")
    trainer.train()
    assert len(schedule.knots) >= 1 and schedule.knots[0] > 4  # a loss-driven knot after checkpoint-4
    assert [e["reason"] for e in trainer.state.log_history if "knot" in e] == [
        d.reason for d in schedule.decisions
    ]
    assert (tmp_path / "run" / "checkpoint-4" / SCHEDULE_STATE_FILE).is_file()
    weights = {
        n: layer.get_base_layer().weight.detach().clone() for n, layer, _ in lora_layers(trainer.model)
    }

    resumed, resumed_schedule = make_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed_schedule.knots == schedule.knots
    assert resumed_schedule.decisions == schedule.decisions  # same smoothed losses: the EMA was restored
    for name, layer, _ in lora_layers(resumed.model):
        torch.testing.assert_close(layer.get_base_layer().weight, weights[name], atol=1e-6, rtol=1e-6)
