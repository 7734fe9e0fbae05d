"""COLA inside a real transformers Trainer: knots at the right steps, and resume mid-chain is exact."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from chainlora import ChainOfLoRACallback, ChainSchedule
from chainlora.errors import ConfigError
from chainlora.links import lora_layers
from chainlora.state import CHAIN_STATE_FILE
from chainlora.testing import tiny_causal_lm, tiny_chain_trainer

TOTAL_STEPS = 6


def make_trainer(
    arch: str, output_dir, schedule: ChainSchedule, optimizer_reset: float = 1.0
) -> tuple[Trainer, ChainOfLoRACallback]:
    rank = schedule.rank_of_link(1) or 8
    return tiny_chain_trainer(output_dir, schedule, arch=arch, rank=rank, optimizer_reset=optimizer_reset)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    weights = {}
    for name, layer, adapter in lora_layers(trainer.model):
        weights[name + ".base"] = layer.get_base_layer().weight.detach().clone()
        weights[name + ".A"] = layer.lora_A[adapter].weight.detach().clone()
        weights[name + ".B"] = layer.lora_B[adapter].weight.detach().clone()
    return weights


def test_knots_at_scheduled_steps_and_resume_mid_chain_is_exact(tmp_path):
    for arch in ("opt", "llama"):
        schedule = ChainSchedule((2, 4), TOTAL_STEPS, ranks=(8, 4, 2))
        trainer, callback = make_trainer(arch, tmp_path / arch / "full", schedule)
        trainer.train()
        assert [k.step for k in callback.knots] == [2, 4]
        assert [k.next_rank for k in callback.knots] == [4, 2]
        assert [entry["knot"] for entry in trainer.state.log_history if "knot" in entry] == [1, 2]
        assert (tmp_path / arch / "full" / "checkpoint-3" / CHAIN_STATE_FILE).is_file()
        uninterrupted = final_weights(trainer)

        # a new process picks the run up at step 3: after the first knot and its rank step-down 8 → 4
        resumed, resumed_callback = make_trainer(arch, tmp_path / arch / "full", schedule)
        resumed.train(resume_from_checkpoint=str(tmp_path / arch / "full" / "checkpoint-3"))
        assert [k.step for k in resumed_callback.knots] == [2, 4]
        after_resume = final_weights(resumed)
        for key, value in uninterrupted.items():
            torch.testing.assert_close(after_resume[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_a_chain_that_keeps_pruned_optimizer_state_resumes_exactly(tmp_path):
    """optimizer_reset 0.9 (ReLoRA's pruning): each knot zeroes 90% of the links' moments and keeps the rest, and
    the checkpoint after a knot holds that pruned state, so resuming there continues the very same run."""
    schedule = ChainSchedule((2, 4), TOTAL_STEPS)
    trainer, callback = make_trainer("llama", tmp_path / "full", schedule, optimizer_reset=0.9)
    trainer.train()
    zeroed = [k.optimizer_state_zeroed for k in callback.knots]
    assert len(zeroed) == 2 and all(0.89 < z < 0.91 for z in zeroed), zeroed
    logged = [e["optimizer_state_zeroed"] for e in trainer.state.log_history if "knot" in e]
    assert logged == zeroed
    uninterrupted = final_weights(trainer)
    resumed, _ = make_trainer("llama", tmp_path / "full", schedule, optimizer_reset=0.9)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for key, value in final_weights(resumed).items():
        torch.testing.assert_close(value, uninterrupted[key], atol=1e-6, rtol=1e-6, msg=key)
    # and it is another run than the paper's full reset
    paper, _ = make_trainer("llama", tmp_path / "paper", schedule)
    paper.train()
    assert any(not torch.equal(w, uninterrupted[k]) for k, w in final_weights(paper).items())


def test_keeping_optimizer_state_across_a_rank_change_is_refused_before_the_first_step(tmp_path):
    trainer, _ = make_trainer(
        "llama", tmp_path / "run", ChainSchedule((2,), 4, ranks=(8, 4)), optimizer_reset=0.5
    )
    with pytest.raises(ConfigError, match=r"optimizer_reset 0\.5 keeps optimizer state across a knot"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))


def test_callback_inside_trl_sft_trainer(tmp_path, tokenizer):
    """TRL's SFTTrainer is a Trainer: the same callback ties the knots there too."""
    datasets = __import__("pytest").importorskip("datasets")
    trl = __import__("pytest").importorskip("trl")
    texts = ["The capital of France is Paris.", "It was great.", "Yes or No? Maybe.", "It was terrible."] * 4
    model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    schedule = ChainSchedule((2,), 4, ranks=(4, 2))
    callback = ChainOfLoRACallback(schedule)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        max_length=32,
        logging_steps=1,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert [(k.step, k.next_rank) for k in callback.knots] == [(2, 2)]
    assert {layer.r[a] for _, layer, a in lora_layers(trainer.model)} == {2}
