"""The analytic FLOP counter against hand-computed numbers, and rank step-down makes a link cheaper."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from chainlora import tie_knot
from chainlora.recipes.flops import (
    Matmul,
    attention_flops,
    flop_model,
    matmul_flops,
    sequence_flops,
    step_flops,
)
from chainlora.testing import tiny_causal_lm


def test_one_matmul_by_hand():
    frozen = Matmul("w", in_features=4, out_features=3, stage=(0, 0), trainable=False)
    assert matmul_flops(frozen, 5, input_grad=False) == 2 * 12 * 5  # forward only
    assert matmul_flops(frozen, 5, input_grad=True) == 4 * 12 * 5  # + input grad
    trained = Matmul("w", 4, 3, (0, 0), trainable=True)
    assert matmul_flops(trained, 5, input_grad=True) == 6 * 12 * 5  # + weight grad: the 6N rule
    lora = Matmul("w", 4, 3, (0, 0), trainable=False, lora_rank=2)
    a, b = 4 * 2, 2 * 3
    # base fwd+igrad, LoRA fwd, LoRA weight grads, B's input grad, A's input grad
    assert matmul_flops(lora, 5, input_grad=True) == (4 * 12 + 2 * (a + b) + 2 * (a + b) + 2 * b + 2 * a) * 5
    assert attention_flops(d=8, seq_len=10, tokens=20, backward=False) == 2 * (2 * 10 * 8) * 20
    assert attention_flops(d=8, seq_len=10, tokens=20, backward=True) == 3 * 2 * (2 * 10 * 8) * 20


def _llama_lora(rank: int = 8):
    # tiny llama: hidden 32, 2 layers, 4 heads (q width 32), MLP 32 -> 64 -> 32, tied head 32 -> 320
    model = tiny_causal_lm("llama", vocab_size=320)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def test_tiny_llama_lora_by_hand():
    sequences, seq_len = 2, 10
    tokens = sequences * seq_len
    h, ffn, vocab, r = 32, 64, 320, 8
    attn = 2 * (2 * seq_len * h) * 3  # QKᵀ and P·V forward, both operands' grads backward
    lora_no_igrad = 2 * (h * r + r * h) * 2 + 2 * (r * h)  # fwd + weight grads + B's input grad
    lora_igrad = lora_no_igrad + 2 * (h * r)  # + A's input grad
    # layer 0: q/k/v read the frozen embedding (no input grads), everything after them needs input grads
    layer0 = 3 * 2 * h * h + 2 * lora_no_igrad + attn + 4 * h * h + 2 * 4 * h * ffn + 4 * ffn * h
    layer1 = 3 * 4 * h * h + 2 * lora_igrad + attn + 4 * h * h + 2 * 4 * h * ffn + 4 * ffn * h
    head = 4 * h * vocab
    expected = (layer0 + layer1 + head) * tokens
    assert step_flops(flop_model(_llama_lora()), sequences, seq_len) == expected == 2_713_600


def test_full_fine_tuning_is_6n_plus_attention():
    model = tiny_causal_lm("llama", vocab_size=320)
    h, ffn, vocab, seq_len = 32, 64, 320, 10
    per_layer = 6 * (4 * h * h + 3 * h * ffn) + 2 * (2 * seq_len * h) * 3
    expected = (2 * per_layer + 6 * h * vocab) * 20
    assert step_flops(flop_model(model), 2, seq_len) == expected


def test_lower_rank_second_link_costs_less():
    model = _llama_lora(rank=8)
    first = step_flops(flop_model(model), 4, 16)
    tie_knot(model, rank=4)
    second = step_flops(flop_model(model), 4, 16)
    tie_knot(model, rank=8)
    assert second < first == step_flops(flop_model(model), 4, 16)
    # the saving is exactly the LoRA terms of the rank difference (frozen base unchanged)
    h, tokens = 32, 4 * 16
    saving_per_lora = lambda igrad: 2 * 2 * (2 * h * 4) + 2 * (4 * h) + (2 * h * 4 if igrad else 0)  # noqa: E731
    assert first - second == 2 * (saving_per_lora(False) + saving_per_lora(True)) * tokens


def test_opt_matches_llama_structure():
    fm = flop_model(
        get_peft_model(tiny_causal_lm("opt", vocab_size=320), LoraConfig(r=8, target_modules=["q_proj"]))
    )
    stages = {m.name.rsplit(".", 1)[-1]: m.stage for m in fm.matmuls if ".layers.1." in m.name}
    assert stages == {
        "k_proj": (1, 0),
        "v_proj": (1, 0),
        "q_proj": (1, 0),
        "out_proj": (1, 2),
        "fc1": (1, 3),
        "fc2": (1, 4),
    }
    assert fm.first_trainable == (0, 0) and [d for _, d in fm.attention] == [32, 32]


def test_a_batch_counts_its_real_tokens_however_it_is_split_or_padded():
    """#17 item 14: ``train_flops`` of the same global work does not depend on the number of processes (or
    micro-batches): each sequence counts its own tokens, padding excluded, and the Trainer sums the processes."""
    fm = flop_model(_llama_lora())
    lengths = [5, 17, 9, 12]
    whole = sequence_flops(fm, lengths)
    assert whole == sequence_flops(fm, lengths[:2]) + sequence_flops(fm, lengths[2:])
    assert whole == sum(step_flops(fm, 1, n) for n in lengths)
    assert whole < step_flops(fm, 4, 17)  # what counting the padded batch gave
    assert sequence_flops(fm, [0, 0]) == 0
