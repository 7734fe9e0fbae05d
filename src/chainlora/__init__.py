"""chainlora: Chain of LoRA (COLA) fine-tuning of causal language models, on PEFT LoRA.

Public API::

    tie_knot(model, optimizer)        merge every LoRA link into its base weight, start a fresh link, reset state
    ChainSchedule                     where the knots go (steps, epochs, fractions) and each link's rank
    ChainOfLoRACallback(schedule)     COLA inside any transformers Trainer (resumable mid-chain)
    merge_chain(model)                fold the last link in and drop the LoRA modules (zero inference overhead)
"""

from chainlora.callback import ChainOfLoRACallback
from chainlora.chain import ChainSchedule, KnotError, KnotRecord, TiedLink, merge_chain, tie_knot

__version__ = "0.1.0"

__all__ = [
    "ChainOfLoRACallback",
    "ChainSchedule",
    "KnotError",
    "KnotRecord",
    "TiedLink",
    "merge_chain",
    "tie_knot",
]
