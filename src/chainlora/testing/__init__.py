"""Tiny random models and a tiny trained tokenizer, for tests and benchmarks (no download, seconds to build)."""

from chainlora.testing.tiny import (
    TINY_CORPUS,
    TokenDataset,
    float64_copy,
    lora_on_qv,
    perturb_links,
    tiny_causal_lm,
    tiny_chain_trainer,
    tiny_model_dir,
    tiny_tokenizer,
)

__all__ = [
    "TINY_CORPUS",
    "TokenDataset",
    "float64_copy",
    "lora_on_qv",
    "perturb_links",
    "tiny_causal_lm",
    "tiny_chain_trainer",
    "tiny_model_dir",
    "tiny_tokenizer",
]
