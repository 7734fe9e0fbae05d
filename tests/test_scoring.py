"""Fast candidate scoring equals the harness's one-forward-per-candidate scoring; generation; evaluate; losses."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from tokenizers import processors
from torch.nn import functional as F

from chainlora.tasks import (
    Example,
    TaskTrainer,
    TrainingCollator,
    build_training_dataset,
    compute_loss,
    encode_examples,
    evaluate,
    generate_answers,
    get_task,
    length_grouped_sampler,
    score_candidates,
    score_candidates_naive,
)
from chainlora.tasks.scoring import length_batches
from chainlora.testing import float64_copy, tiny_causal_lm, tiny_tokenizer


def choice(prompt: str, continuations: list[str], gold: int = 0) -> Example:
    return Example(prompt, tuple(prompt + c for c in continuations), gold, (gold,))


SYNTHETIC = [
    choice("Does this mean that the hypothesis is true? Yes or No?\n", ["Yes", "No"], 1),  # one-token options
    choice(
        "the man broke his toe because", [" he dropped a hammer.", " the glass fell."]
    ),  # whole continuations
    choice(
        "Suppose the premise holds. Can we infer that it is raining? Yes, No, or Maybe?\n",
        ["Yes", "No", "Maybe"],
        2,
    ),
    choice(
        "Question: who wrote the book?\nAnswer:", [" the author", " Paris", " France", " the man", " 1999"], 3
    ),
    choice(
        "the capital of Fr", ["ance is Paris.", "ance was great."]
    ),  # BPE merges across the prompt boundary
    choice("It was", [" great", " terrible"], 1),
    choice("Which mark ends it?\n", [".", "?", "!"], 1),  # every option one token: no candidate pass at all
]


def assert_scores_close(fast, naive, tolerance=1e-5):
    assert [len(scores) for scores in fast] == [len(scores) for scores in naive]
    for fast_scores, naive_scores in zip(fast, naive, strict=True):
        assert fast_scores == pytest.approx(naive_scores, abs=tolerance)


def test_option_is_the_last_token_count_difference(tokenizer):
    merged = SYNTHETIC[4]
    prompt_ids = tokenizer(merged.prompt)["input_ids"]
    full_ids = tokenizer(merged.candidates[0])["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # "Fr" + "ance" merge into "ĠFrance"
    encoded = encode_examples([merged], tokenizer)[0]
    assert encoded.sequences[0] == tuple(full_ids)
    assert encoded.option_lengths[0] == len(full_ids) - len(prompt_ids)


def test_truncation_keeps_bos_and_the_option(tokenizer):
    encoded = encode_examples(SYNTHETIC[:2], tokenizer, max_length=8)
    for item, example in zip(encoded, SYNTHETIC[:2], strict=True):
        for sequence, option_length, text in zip(
            item.sequences, item.option_lengths, example.candidates, strict=True
        ):
            full = tokenizer(text)["input_ids"]
            assert len(sequence) == min(8, len(full))
            assert sequence[0] == tokenizer.bos_token_id
            assert sequence[1:] == tuple(full[len(full) - len(sequence) + 1 :])
            assert 1 <= option_length < len(sequence)


def test_fast_scoring_equals_naive(tiny_model, tokenizer):
    naive = score_candidates_naive(tiny_model, tokenizer, SYNTHETIC)
    for batch_size in (1, 2, 5):
        assert_scores_close(score_candidates(tiny_model, tokenizer, SYNTHETIC, batch_size=batch_size), naive)


def test_synthetic_examples_cover_every_kind_of_option(tokenizer):
    kinds = [set(item.option_lengths) for item in encode_examples(SYNTHETIC, tokenizer)]
    assert {1} in kinds  # single-token options only (the prefix pass scores them all)
    assert any(min(lengths) > 1 for lengths in kinds)  # multi-token options only
    assert any(1 in lengths and len(lengths) > 1 for lengths in kinds)  # one- and multi-token mixed
    assert any(len(lengths) >= 3 for lengths in kinds)  # three or more different lengths in one example


@pytest.mark.parametrize("forward_cost", [0.0, 16.0, math.inf])
def test_fast_scoring_equals_naive_in_float64(tiny_model, tokenizer, forward_cost):
    """Exactness beyond fp32 round-off: in float64 both paths agree to 1e-9, whatever the batching, while
    scoring an option after a different context (what a wrong position, mask or cache row amounts to) moves
    its score by more than 1e-5 on these models."""
    model = float64_copy(tiny_model)
    naive = score_candidates_naive(model, tokenizer, SYNTHETIC)
    for batch_size in (1, 2, 3, 8):
        fast = score_candidates(model, tokenizer, SYNTHETIC, batch_size=batch_size, forward_cost=forward_cost)
        assert_scores_close(fast, naive, tolerance=1e-9)
    truncated = score_candidates(
        model, tokenizer, SYNTHETIC, batch_size=3, max_length=9, forward_cost=forward_cost
    )
    assert_scores_close(truncated, score_candidates_naive(model, tokenizer, SYNTHETIC, max_length=9), 1e-9)
    shifted = [choice("X " + e.prompt, [c[len(e.prompt) :] for c in e.candidates]) for e in SYNTHETIC]
    moved = score_candidates_naive(model, tokenizer, shifted)
    assert (
        min(abs(a - b) for xs, ys in zip(moved, naive, strict=True) for a, b in zip(xs, ys, strict=True))
        > 1e-5
    )


def padded_cost(batches, lengths, forward_cost):
    return sum(forward_cost + len(batch) * lengths[batch[0]] for batch in batches)


def test_prefix_batches_trade_padding_against_forwards():
    lengths = [300, 290, 200, 190, 185, 50, 50, 50, 50, 49]
    runs = [list(batch) for batch in length_batches(lengths, 8, math.inf)]
    assert runs == [list(range(8)), [8, 9]]  # unmeasured device: full consecutive batches
    assert [list(b) for b in length_batches(lengths, 8, 0.0)] == [[0], [1], [2], [3], [4], [5, 6, 7, 8], [9]]
    assert len(length_batches(lengths, 8, 1000.0)) == 2  # padding is cheap next to a forward: fewest batches
    assert length_batches([], 8, 48.0) == []
    # Optimal among all consecutive cuts into batches of at most 3 (brute force).
    for forward_cost in (0.0, 5.0, 48.0, 200.0):
        batches = [list(b) for b in length_batches(lengths, 3, forward_cost)]
        assert [i for batch in batches for i in batch] == list(range(len(lengths)))
        assert all(1 <= len(batch) <= 3 for batch in batches)
        best = math.inf
        for mask in range(2 ** (len(lengths) - 1)):
            cuts = [0, *(k + 1 for k in range(len(lengths) - 1) if mask >> k & 1), len(lengths)]
            other = [list(range(a, b)) for a, b in itertools.pairwise(cuts)]
            if all(len(batch) <= 3 for batch in other):
                best = min(best, padded_cost(other, lengths, forward_cost))
        assert padded_cost(batches, lengths, forward_cost) == best


def test_fast_scoring_equals_naive_when_truncated(tiny_model, tokenizer):
    fast = score_candidates(tiny_model, tokenizer, SYNTHETIC, batch_size=3, max_length=9)
    assert_scores_close(fast, score_candidates_naive(tiny_model, tokenizer, SYNTHETIC, max_length=9))


def test_fast_scoring_equals_naive_on_real_rows(tiny_model, tokenizer, shared_data):
    examples = []
    for name in ("cb", "copa", "record", "multirc", "boolq", "mcscript"):
        split = "test" if name == "mcscript" else "validation"
        with open(shared_data / name / f"{split}.jsonl", encoding="utf-8") as handle:
            examples.append(get_task(name).example(json.loads(handle.readline())))
    examples[2] = Example(examples[2].prompt, examples[2].candidates[:6], 0, (0,))  # ReCoRD: 6 of 19 entities
    fast = score_candidates(tiny_model, tokenizer, examples, batch_size=4, max_length=128)
    assert_scores_close(fast, score_candidates_naive(tiny_model, tokenizer, examples, max_length=128))


def test_candidates_without_a_shared_token_fall_back_to_naive(tiny_model):
    no_bos = tiny_tokenizer()
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    example = choice("th", ["e man", "x man"])
    first_tokens = {no_bos(c)["input_ids"][0] for c in example.candidates}
    assert len(first_tokens) == 2  # "the" vs "th": nothing shared
    examples = [example, *SYNTHETIC[:2]]
    assert_scores_close(
        score_candidates(tiny_model, no_bos, examples, batch_size=2),
        score_candidates_naive(tiny_model, no_bos, examples),
    )
    model = float64_copy(tiny_model)
    assert_scores_close(
        score_candidates(model, no_bos, examples, batch_size=2),
        score_candidates_naive(model, no_bos, examples),
        tolerance=1e-9,
    )


def test_scoring_and_loss_go_through_a_peft_lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), config)
    examples = SYNTHETIC[:4]
    fast = score_candidates(model, tokenizer, examples, batch_size=2)
    assert_scores_close(fast, score_candidates_naive(model, tokenizer, examples))
    dataset = build_training_dataset(get_task("cb"), examples, tokenizer)
    compute_loss(model, TrainingCollator(tokenizer)([dataset[0], dataset[1]])).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)


# ---- generation ------------------------------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM in ``generate_answers``: appends a scripted continuation to every prompt."""

    def __init__(self, continuations: dict[int, list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations  # prompt length -> new tokens
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        rows = [
            input_ids[i].tolist()
            + self.continuations[int(attention_mask[i].sum())][: kwargs["max_new_tokens"]]
            for i in range(len(input_ids))
        ]
        width = max(len(row) for row in rows)
        return torch.tensor([row + [kwargs["pad_token_id"]] * (width - len(row)) for row in rows])


def test_generation_stops_at_newline_or_eos_and_strips(tokenizer):
    examples = [
        Example("Question: where?\nAnswer:", ("x",), 0, (0,), ("France",)),
        Example("It was", ("x",), 0, (0,), ("a",)),
    ]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    paris = tokenizer(" Paris the", add_special_tokens=False)["input_ids"]
    great = tokenizer(" great", add_special_tokens=False)["input_ids"]
    lengths = [len(tokenizer(e.prompt)["input_ids"]) for e in examples]
    model = ScriptedModel(
        {lengths[0]: [*paris, newline, *great], lengths[1]: [*great, tokenizer.eos_token_id, *paris]}
    )
    assert generate_answers(model, tokenizer, examples, batch_size=2) == ["Paris the", "great"]
    assert model.calls[0]["eos_token_id"] == [newline, tokenizer.eos_token_id]
    assert model.calls[0]["do_sample"] is False and model.calls[0]["max_new_tokens"] == 50
    # Budget: at most min(max_new_tokens, max_length - prompt length) new tokens.
    assert generate_answers(model, tokenizer, examples[:1], max_new_tokens=1) == [
        tokenizer.decode(paris[:1]).strip()
    ]


def test_batched_generation_equals_one_at_a_time(tiny_model, tokenizer):
    examples = [Example(e.prompt, e.candidates[:1], 0, (0,), ("x",)) for e in SYNTHETIC]
    batched = generate_answers(tiny_model, tokenizer, examples, batch_size=4, max_new_tokens=6)
    assert batched == generate_answers(tiny_model, tokenizer, examples, batch_size=1, max_new_tokens=6)
    # ... and the harness's unpadded call.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    for example, answer in zip(examples, batched, strict=True):
        input_ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
        out = tiny_model.generate(
            input_ids,
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=[newline, tokenizer.eos_token_id],
            pad_token_id=0,
        )
        assert answer == tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


# ---- evaluate ---------------------------------------------------------------------------------------------------------


def test_evaluate_choice_task_is_accuracy_of_the_argmax(tiny_model, tokenizer):
    tiny_model.train()
    result = evaluate(tiny_model, tokenizer, get_task("cb"), SYNTHETIC, batch_size=3)
    naive = score_candidates_naive(tiny_model, tokenizer, SYNTHETIC)
    predicted = [max(range(len(s)), key=s.__getitem__) for s in naive]
    assert result["predictions"] == predicted
    assert (
        result["score"]
        == result["accuracy"]
        == pytest.approx(sum(p == e.gold for p, e in zip(predicted, SYNTHETIC, strict=True)) / len(SYNTHETIC))
    )
    assert result["metric"] == "accuracy" and result["num_examples"] == len(SYNTHETIC)
    assert tiny_model.training  # restored


def test_evaluate_generation_task_reports_f1_and_em(tokenizer):
    examples = [
        Example("It was", ("x",), 0, (0,), ("great", "very great")),
        Example("Question: where?\nAnswer:", ("x",), 0, (0,), ("the man",)),
    ]
    lengths = [len(tokenizer(e.prompt)["input_ids"]) for e in examples]
    great = tokenizer(" great", add_special_tokens=False)["input_ids"]
    man = tokenizer(" a man wrote", add_special_tokens=False)["input_ids"]
    model = ScriptedModel({lengths[0]: great, lengths[1]: man})
    result = evaluate(model, tokenizer, get_task("squad"), examples)
    # "great" = gold 1 (F1 1, EM 1); "a man wrote" vs "the man": [man wrote] vs [man] -> P 1/2, R 1 -> 2/3.
    assert result["predictions"] == ["great", "a man wrote"]
    assert result["f1"] == result["score"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["em"] == pytest.approx(0.5)


# ---- training losses ----------------------------------------------------------------------------------------------


def test_classification_loss_equals_cross_entropy_of_naive_scores(tiny_model, tokenizer):
    examples = [SYNTHETIC[0], SYNTHETIC[2], SYNTHETIC[3], SYNTHETIC[4]]  # 2, 3, 5, 2 candidates
    dataset = build_training_dataset(get_task("rte"), examples, tokenizer)
    batch = TrainingCollator(tokenizer)([dataset[i] for i in range(len(dataset))])
    loss = compute_loss(tiny_model, batch)
    naive = score_candidates_naive(tiny_model, tokenizer, examples)
    by_hand = sum(
        -F.log_softmax(torch.tensor(s), -1)[e.gold] for s, e in zip(naive, examples, strict=True)
    ) / len(examples)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_lm_loss_is_the_mean_over_all_gold_option_tokens(tiny_model, tokenizer):
    examples = [SYNTHETIC[1], choice("It was", [" great", " terrible"], 1)]
    dataset = build_training_dataset(get_task("copa"), examples, tokenizer)
    batch = TrainingCollator(tokenizer)([dataset[0], dataset[1]])
    assert "candidate_counts" not in batch and batch["input_ids"].shape[0] == 2
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([tokenizer(example.candidates[example.gold])["input_ids"]])
        option_length = ids.shape[1] - len(tokenizer(example.prompt)["input_ids"])
        log_probs = (
            tiny_model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        )
        total, count = total - log_probs[-option_length:].sum().item(), count + option_length
    assert compute_loss(tiny_model, batch).item() == pytest.approx(total / count, abs=1e-5)


def test_loss_has_gradients(tiny_model, tokenizer):
    dataset = build_training_dataset(get_task("cb"), SYNTHETIC[:3], tokenizer)
    compute_loss(tiny_model, TrainingCollator(tokenizer)([dataset[0], dataset[2]])).backward()
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)


def test_collator_left_pads_to_a_multiple_of_eight(tokenizer):
    dataset = build_training_dataset(get_task("cb"), SYNTHETIC[:3], tokenizer)
    batch = TrainingCollator(tokenizer)([dataset[0], dataset[2]])
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["candidate_counts"].tolist() == [2, 3] and batch["labels"].tolist() == [1, 2]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    assert dataset.lengths == [max(len(row) for row in item["input_ids"]) for item in dataset.items]
    assert sorted(length_grouped_sampler(dataset, batch_size=2)) == [0, 1, 2]


def test_generation_tasks_train_on_max_length_minus_max_new_tokens(tokenizer):
    example = Example(
        "Question: who wrote the book?\nAnswer:",
        ("Question: who wrote the book?\nAnswer: the author\n",),
        0,
        (0,),
        ("the author",),
    )
    dataset = build_training_dataset(get_task("squad"), [example], tokenizer, max_length=12, max_new_tokens=4)
    assert len(dataset[0]["input_ids"]) == 1 and len(dataset[0]["input_ids"][0]) == 8


def test_task_trainer_trains_and_reports_the_dev_loss(tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    dataset = build_training_dataset(get_task("cb"), SYNTHETIC[:4], tokenizer)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = TrainingCollator(tokenizer)
    trainer = TaskTrainer(
        model=model, args=arguments, train_dataset=dataset, eval_dataset=dataset, data_collator=collator
    )
    assert trainer._get_train_sampler().lengths == dataset.lengths
    before = compute_loss(model, collator([dataset[i] for i in range(4)])).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(before, abs=1e-5)
    assert trainer.train().training_loss == pytest.approx(before, rel=0.2)  # a mean, not x accumulation steps
