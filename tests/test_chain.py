"""The paper's claims about the chain, stated as checks (tiny models, fp32, CPU)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from chainlora import ChainSchedule, merge_chain, tie_knot
from chainlora.chain import KnotError, link_delta, link_delta_norm_sq, reset_optimizer_state
from chainlora.errors import ConfigError
from chainlora.links import lora_layers
from chainlora.testing import lora_on_qv as lora
from chainlora.testing import perturb_links, tiny_causal_lm


def batch(tokenizer, n: int = 3) -> dict[str, torch.Tensor]:
    texts = ["The capital of France is Paris.", "It was great", "Yes or No? Maybe."][:n]
    return tokenizer(texts, return_tensors="pt", padding=True)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer, _ in lora_layers(model)}


def train_steps(model, optimizer, inputs, steps: int) -> None:
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def adapter_params(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_knot_preserves_function_and_moves_base(tiny_model, tokenizer):
    model = lora(tiny_model)
    perturb_links(model)
    inputs = batch(tokenizer)
    before_weights = base_weights(model)
    with torch.no_grad():
        before = model(**inputs).logits
    record = tie_knot(model)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    moved = [not torch.equal(before_weights[n], w) for n, w in base_weights(model).items()]
    assert all(moved) and record.delta_norm > 0 and record.link == 1 and record.layers == len(moved)


def test_base_equals_w0_plus_sum_of_links_and_final_merge_is_plain_model(tiny_model, tokenizer):
    plain_params = sum(p.numel() for p in tiny_model.parameters())
    model = lora(tiny_model)
    w0 = base_weights(model)
    expected = {n: w.clone() for n, w in w0.items()}
    for _ in range(3):
        perturb_links(model)
        for name, layer, adapter in lora_layers(model):
            expected[name] += (
                layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
            )
        tie_knot(model)
    for name, weight in base_weights(model).items():
        assert torch.linalg.norm(weight - expected[name]) <= 1e-6 * torch.linalg.norm(expected[name])
    perturb_links(model)
    inputs = batch(tokenizer)
    with torch.no_grad():
        chained = model(**inputs).logits
    merged = merge_chain(model)
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert sum(p.numel() for p in merged.parameters()) == plain_params
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, chained, atol=1e-5)


def test_only_adapter_params_change_and_knot_resets_state(tiny_model, tokenizer):
    model = lora(tiny_model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    inputs = batch(tokenizer)
    train_steps(model, optimizer, inputs, 3)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert len(optimizer.state) > 0
    tie_knot(model, optimizer)
    assert len(optimizer.state) == 0
    for _, layer, adapter in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B[adapter].weight) == 0
        assert torch.count_nonzero(layer.lora_A[adapter].weight) > 0


def test_first_step_after_knot_equals_a_fresh_optimizer_step(tokenizer):
    """Bias correction included: the step counter is cleared with the moments."""
    model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    inputs = batch(tokenizer)
    train_steps(model, optimizer, inputs, 4)
    tie_knot(model, optimizer)
    start = [p.detach().clone() for p in adapter_params(model)]
    fresh = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in adapter_params(model)], lr=1e-2)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    optimizer.zero_grad()
    loss.backward()
    for p_fresh, p in zip(fresh.param_groups[0]["params"], adapter_params(model), strict=True):
        p_fresh.grad = p.grad.clone()
    optimizer.step()
    fresh.step()
    for p_fresh, p, p0 in zip(fresh.param_groups[0]["params"], adapter_params(model), start, strict=True):
        assert not torch.equal(p, p0)
        assert torch.allclose(p_fresh, p, atol=1e-7)


def adam_moments(optimizer, params) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in optimizer.state[p].items()} for p in params]


def trained_with_adam(model, tokenizer, steps: int):
    """A LoRA model after ``steps`` AdamW steps: (model, its adapter params, the optimizer, the inputs, a copy of
    the optimizer state)."""
    model = lora(model)
    params = adapter_params(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = batch(tokenizer)
    train_steps(model, optimizer, inputs, steps)
    return model, params, optimizer, inputs, adam_moments(optimizer, params)


def test_partial_optimizer_reset_zeroes_the_smallest_moments_and_keeps_the_step(tiny_model, tokenizer):
    """ReLoRA's magnitude pruning: 90% of every moment zeroed, smallest first; the rest and the step count kept."""
    model, params, optimizer, inputs, before_state = trained_with_adam(tiny_model, tokenizer, 3)
    with torch.no_grad():
        before = model(**inputs).logits
    record = tie_knot(model, optimizer, optimizer_reset=0.9)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-6, rtol=0)  # still function-preserving
    zeroed = total = 0
    for p, old in zip(params, before_state, strict=True):
        state = optimizer.state[p]
        assert torch.equal(state["step"], old["step"])  # bias correction continues
        for key in ("exp_avg", "exp_avg_sq"):
            kept = state[key] != 0
            keep_count = old[key].numel() - round(0.9 * old[key].numel())
            assert int(kept.sum()) == keep_count  # no ties among these continuous values
            assert torch.equal(state[key][kept], old[key][kept])  # survivors untouched
            if keep_count:  # every survivor is at least as large as every entry zeroed
                assert old[key].abs()[kept].min() >= old[key].abs()[~kept].max()
            zeroed += int((~kept).sum())
            total += old[key].numel()
    assert record.optimizer_state_zeroed == pytest.approx(zeroed / total)
    assert 0.89 < record.optimizer_state_zeroed < 0.91


def test_optimizer_reset_zero_keeps_the_state_and_one_clears_it(tiny_model, tokenizer):
    model, params, optimizer, inputs, before_state = trained_with_adam(tiny_model, tokenizer, 2)
    record = tie_knot(model, optimizer, optimizer_reset=0.0)
    assert record.optimizer_state_zeroed == 0.0
    for p, old in zip(params, before_state, strict=True):
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in old.items())
    train_steps(model, optimizer, inputs, 1)
    assert tie_knot(model, optimizer).optimizer_state_zeroed == 1.0 and len(optimizer.state) == 0
    assert tie_knot(model, optimizer).optimizer_state_zeroed is None  # no step since: nothing to reset


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer_reset": 1.5}, "optimizer_reset must be a number in [0, 1], got 1.5"),
        ({"optimizer_reset": -0.1}, "optimizer_reset must be a number in [0, 1]"),
        ({"optimizer_reset": 0.5, "rank": 4}, "a rank change cannot"),
        ({"optimizer_reset": 0.0, "rank": 4}, "a rank change cannot"),
    ],
)
def test_optimizer_reset_that_cannot_apply_is_refused_with_the_model_untouched(
    tiny_model, tokenizer, kwargs, message
):
    model, params, optimizer, _, state = trained_with_adam(tiny_model, tokenizer, 1)  # rank 8
    weights = base_weights(model)
    with pytest.raises(ConfigError, match=re.escape(message)):
        tie_knot(model, optimizer, **kwargs)
    assert all(torch.equal(weights[n], w) for n, w in base_weights(model).items())
    assert all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(adam_moments(optimizer, params), state, strict=True)
    )
    tie_knot(model, optimizer, optimizer_reset=0.5, rank=8)  # the same rank is no change


def test_rank_step_down_mid_training_with_same_optimizer(tiny_model, tokenizer):
    model = lora(tiny_model, r=8)
    optimizer = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=10)
    inputs = batch(tokenizer)
    train_steps(model, optimizer, inputs, 2)
    record = tie_knot(model, optimizer, rank=4)
    assert record.next_rank == 4 and model.peft_config["default"].r == 4
    for _, layer, adapter in lora_layers(model):
        assert layer.lora_A[adapter].weight.shape[0] == 4 and layer.lora_B[adapter].weight.shape[1] == 4
        assert layer.scaling[adapter] == 16 / 4
    group_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert group_params == {id(p) for p in adapter_params(model)}
    before = [p.detach().clone() for p in adapter_params(model)]
    train_steps(model, optimizer, inputs, 2)
    scheduler.step()
    assert all(not torch.equal(p, b) for p, b in zip(adapter_params(model), before, strict=True))


def test_rslora_scaling_follows_rank(tokenizer):
    model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)), r=8, use_rslora=True)
    tie_knot(model, rank=4)
    for _, layer, adapter in lora_layers(model):
        assert layer.scaling[adapter] == pytest.approx(16 / math.sqrt(4))


def test_chain_of_low_rank_links_fits_a_higher_rank_target():
    """Frank-Wolfe view: 4 rank-4 links fit a rank-16 update that one rank-4 LoRA cannot (same steps)."""

    def final_loss(links: int, steps: int = 400, d: int = 32) -> float:
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("lin", nn.Linear(d, d, bias=False))
        w0 = model.lin.weight.detach().clone()
        u, v = torch.linalg.qr(torch.randn(d, 16))[0], torch.linalg.qr(torch.randn(d, 16))[0]
        target = u @ torch.diag(torch.linspace(1.0, 0.5, 16)) @ v.T  # rank 16
        x = torch.randn(256, d)
        y = x @ (w0 + target).T
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], init_lora_weights="gaussian")
        model = get_peft_model(model, config)
        optimizer = torch.optim.Adam(adapter_params(model), lr=2e-2)
        schedule = ChainSchedule.even(links, steps)
        for step in range(1, steps + 1):
            loss = (model(x) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule.knot_due(step):
                tie_knot(model, optimizer)
        with torch.no_grad():
            return float((model(x) - y).square().mean())

    single, chain = final_loss(1), final_loss(4)
    assert chain <= 0.2 * single, (single, chain)


def test_refused_knot_leaves_model_untouched(tokenizer):
    model = lora(tiny_causal_lm("opt", vocab_size=len(tokenizer)))
    perturb_links(model)
    _, layer, adapter = next(iter(lora_layers(model)))
    with torch.no_grad():
        layer.lora_B[adapter].weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KnotError, match="not finite"):
        tie_knot(model)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) or (state[k].isnan() == after[k].isnan()).all() for k in state)


def test_knot_check_norm_equals_the_formed_delta_and_catches_fp32_overflow(tokenizer):
    """The pre-merge check computes ‖s·B·A‖² (+ LoRA bias) from r×r Gram matrices instead of forming B·A."""
    model = lora(tiny_causal_lm("opt", vocab_size=len(tokenizer)))  # OPT: LoRA bias on
    perturb_links(model)
    for _, layer, adapter in lora_layers(model):
        delta, bias_delta = link_delta(layer, adapter)
        formed = float(delta.double().square().sum() + bias_delta.double().square().sum())
        assert link_delta_norm_sq(layer, adapter) == pytest.approx(formed, rel=1e-5)
    # finite A and B whose product overflows fp32: refused before anything changes
    _, layer, adapter = next(iter(lora_layers(model)))
    with torch.no_grad():
        layer.lora_A[adapter].weight.fill_(1e20)
        layer.lora_B[adapter].weight.fill_(1e20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KnotError, match="not finite"):
        tie_knot(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_exploding_knot_is_refused(tokenizer):
    model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    perturb_links(model, scale=100.0)
    with pytest.raises(KnotError, match="over"):
        tie_knot(model, max_relative_delta=1.0)


def test_fp32_master_keeps_repeated_bf16_merges_exact(tokenizer):
    """Many small merges into a bf16 base: without a master copy they round away; with it, error ≤ 1 bf16 ulp."""

    def merged_error(precise: bool) -> float:
        torch.manual_seed(0)
        model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.bfloat16), r=4)
        _, layer, adapter = next(iter(lora_layers(model)))
        exact = layer.get_base_layer().weight.double().clone()
        for _ in range(20):
            with torch.no_grad():
                layer.lora_B[adapter].weight.normal_(0, 1e-3)
            delta = (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()) * 4.0
            exact += delta
            tie_knot(model, precise=precise)
        weight = layer.get_base_layer().weight.double()
        return float((weight - exact).norm() / (exact - exact.to(torch.bfloat16).double()).norm())

    with_master, without = merged_error(True), merged_error(False)
    # with the master copy the only error left is the final rounding of the exact sum to bf16
    assert with_master <= 1.0 + 1e-6
    assert without > 3 * with_master, (with_master, without)


def test_reset_optimizer_state_unwraps_wrappers():
    param = nn.Parameter(torch.ones(2))
    inner = torch.optim.Adam([param])
    param.grad = torch.ones(2)
    inner.step()

    class Wrapper:
        optimizer = inner

    reset_optimizer_state(Wrapper(), [param])
    assert len(inner.state) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"knots": (4, 2), "total_steps": 10}, "sorted"),
        ({"knots": (2, 2), "total_steps": 10}, "duplicate"),
        ({"knots": (10,), "total_steps": 10}, "outside"),
        ({"knots": (0,), "total_steps": 10}, "outside"),
        ({"knots": (3,), "total_steps": 10, "ranks": (8, 4, 2)}, "2 links"),
        ({"knots": (3,), "total_steps": 10, "ranks": (8, 0)}, "positive"),
        ({"knots": (3,), "total_steps": 0}, "total_steps"),
        ({"knots": (), "total_steps": True}, "total_steps"),
        ({"knots": (2.5,), "total_steps": 10}, "integer"),
    ],
)
def test_schedule_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChainSchedule(**kwargs)


def test_even_schedule_follows_the_paper_epochs():
    # 5 epochs of 10 steps, chain length 2: link 1 = epochs 1-3, link 2 = epochs 4-5
    assert ChainSchedule.even(2, 50, steps_per_epoch=10).knots == (30,)
    assert ChainSchedule.even(3, 50, steps_per_epoch=10).knots == (20, 40)
    assert ChainSchedule.even(1, 50).knots == ()
    assert ChainSchedule.even(4, 400).knots == (100, 200, 300)
    assert ChainSchedule.from_fractions([0.6], 50).knots == (30,)
    schedule = ChainSchedule((3, 6), 10, ranks=(8, 4, 2))
    assert [schedule.link_at(s) for s in (1, 3, 4, 6, 7, 10)] == [1, 1, 2, 2, 3, 3]
    assert schedule.rank_of_link(2) == 4
    with pytest.raises(ConfigError, match="longer"):
        ChainSchedule.even(6, 50, steps_per_epoch=10)


def test_rank_larger_than_layer_is_refused(tokenizer):
    model = lora(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    with pytest.raises(ConfigError, match="larger than layer"):
        tie_knot(model, rank=10_000)
    with pytest.raises(ConfigError, match="positive"):
        tie_knot(model, rank=0)
