"""What tests and benchmarks build on, above the library: tiny random models and a tiny trained tokenizer
(``testing.tiny``: no download, seconds to build), and the fault harness that runs the CLI forked and killable
(``testing.faults``)."""

from chainlora.testing.tiny import (
    TINY_CORPUS,
    TokenDataset,
    float64_copy,
    lora_on_qv,
    perturb_links,
    tiny_causal_lm,
    tiny_chain_trainer,
    tiny_model_dir,
    tiny_task_data,
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
    "tiny_task_data",
    "tiny_tokenizer",
]
