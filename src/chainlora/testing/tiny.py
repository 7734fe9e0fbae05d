"""Tiny random causal LMs (Llama or OPT shapes) and a byte-level BPE tokenizer trained on the spot.

Everything here builds offline in about a second, so unit tests never need a download or a real model.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

TINY_CORPUS = [
    "The capital of France is Paris. It was great. It was terrible.",
    "Does this mean that the hypothesis is true? Yes or No? Maybe.",
    "Suppose the premise holds. Can we infer that it is raining? Yes, No, or Maybe?",
    "Question: who wrote the book? Answer: the author wrote it in 1999.",
    "Title: Normans Context: The Normans were a people in France. Question: where? Answer: France",
    "the man broke his toe so he dropped a hammer because the glass fell",
    "In the previous sentence, does the pronoun refer to the dog? I found this answer correct.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()@#",
]

Arch = Literal["llama", "opt"]


def tiny_tokenizer(vocab_size: int = 320, extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (BOS added to every encoding, like Llama's), trained on TINY_CORPUS.

    ``extra_tokens`` are added as whole tokens (e.g. ``[" great", " terrible"]`` makes SST-2's verbalizers single
    tokens, as in a real vocabulary, so the task qualifies for ``chainlora.tasks.shared_prompt.shared_prompt_view``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def tiny_causal_lm(
    arch: Arch = "llama", vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised fp32 causal LM with q_proj/v_proj attention projections (OPT has biases)."""
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dropout=0.0,
            attention_dropout=0.0,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: expected 'llama' or 'opt'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def tiny_model_dir(
    path: str | Path, arch: Arch = "llama", seed: int = 0, extra_tokens: Sequence[str] = ()
) -> Path:
    """Save a tiny model and its tokenizer (see ``tiny_tokenizer``) as a standard HF folder."""
    path = Path(path)
    tokenizer = tiny_tokenizer(extra_tokens=extra_tokens)
    model = tiny_causal_lm(arch, vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_task_data(
    path: str | Path, task: str = "cb", *, train: int = 40, validation: int = 16, seed: int = 0
) -> Path:
    """Write a small, seeded, made-up copy of a task's data (``train.jsonl`` and ``validation.jsonl`` in the HF
    layout, for ``--data``): CB rows (premise, hypothesis, label 0-2) of words from TINY_CORPUS, of varied length
    (so length grouping has something to group). Tests that need data without ``../shared`` use it."""
    import json
    import random

    if task != "cb":
        raise ValueError(f"tiny_task_data writes CB rows only, not {task!r}")
    rng = random.Random(seed)
    words = " ".join(TINY_CORPUS).split()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("validation", validation)):
        rows = [
            {
                "premise": " ".join(rng.choices(words, k=rng.randint(3, 24))) + ".",
                "hypothesis": " ".join(rng.choices(words, k=rng.randint(2, 8))),
                "idx": i,
                "label": rng.randrange(3),
            }
            for i in range(count)
        ]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def lora_on_qv(model: PreTrainedModel, r: int = 8, **kwargs) -> PeftModel:
    """PEFT LoRA on q,v as the paper: r, α = 16; OPT with a LoRA bias (as the paper), Llama without."""
    is_opt = model.config.model_type == "opt"
    config = LoraConfig(
        r=r,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_bias=is_opt,
        task_type="CAUSAL_LM",
        **kwargs,
    )
    return get_peft_model(model, config)


def perturb_links(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Give every link a non-zero B (and bias), so merge/equality checks cannot pass trivially (B starts at 0)."""
    from chainlora.links import lora_layers

    with torch.no_grad():
        for _, layer, adapter in lora_layers(model):
            for p in layer.lora_B[adapter].parameters():
                p.normal_(0, scale)


class TokenDataset(torch.utils.data.Dataset):
    """``n`` fixed random token sequences (seeded) with LM labels: a Trainer dataset with a known order."""

    def __init__(self, vocab: int, n: int = 24, length: int = 12, seed: int = 1):
        self.ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_chain_trainer(
    output_dir: str | Path,
    schedule: Any,
    *,
    arch: Arch = "llama",
    rank: int = 8,
    save_steps: int = 3,
    optimizer_reset: float = 1.0,
) -> tuple[Any, Any]:
    """A tiny LoRA model (q,v) in a real HF ``Trainer`` with ``ChainOfLoRACallback(schedule, optimizer_reset=…)``:
    fixed data order, seeds and LR, CPU, a checkpoint every ``save_steps``, the loss logged every step; runs
    ``schedule.total_steps``.
    Returns ``(trainer, callback)``; the same arguments give the same run (for resume comparisons)."""
    from transformers import Trainer, TrainingArguments

    from chainlora.callback import ChainOfLoRACallback

    vocab = 320
    model = lora_on_qv(tiny_causal_lm(arch, vocab_size=vocab), r=rank)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=schedule.total_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        seed=7,
        data_seed=7,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = ChainOfLoRACallback(schedule, optimizer_reset=optimizer_reset)
    return Trainer(model=model, args=args, train_dataset=TokenDataset(vocab), callbacks=[callback]), callback


def _rms_norm_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that computes in float64 throughout: the exact reference two scoring paths are checked
    against. transformers' Llama-family RMSNorm computes in fp32 whatever its input (``.to(torch.float32)``), so
    a plain ``.double()`` copy still rounds every norm to fp32; those norms get a float64 forward here. (RoPE
    tables stay fp32-computed: a function of the position alone, the same for every path.)"""
    model64 = copy.deepcopy(model).double()
    for module in model64.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model64
