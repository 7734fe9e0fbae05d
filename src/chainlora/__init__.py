"""chainlora: Chain of LoRA (COLA) fine-tuning of causal language models, on PEFT LoRA.

Public API::

    tie_knot(model, optimizer)        merge every LoRA link into its base weight, start a fresh link, reset state
    ChainSchedule                     where the knots go (steps, epochs, fractions, auto) and each link's rank
    ChainOfLoRACallback(schedule)     COLA inside any transformers Trainer (resumable mid-chain)
    merge_chain(model)                fold the last link in and drop the LoRA modules (zero inference overhead)
    export_adapter(model, path)       the whole chain as one standard PEFT LoRA adapter

Names are imported on first use (PEP 562), so ``import chainlora`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from chainlora import provenance

# bitsandbytes, which PEFT imports when it is installed, warns at import that an optional CPU kernel package
# is missing; nothing chainlora does needs it
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = provenance.VERSION

_EXPORTS = {
    "ChainOfLoRACallback": "chainlora.callback",
    "ChainSchedule": "chainlora.schedules",
    "KnotError": "chainlora.errors",
    "KnotRecord": "chainlora.chain",
    "TiedLink": "chainlora.links",
    "merge_chain": "chainlora.chain",
    "tie_knot": "chainlora.chain",
    "export_adapter": "chainlora.adapter",
    "export_run_adapter": "chainlora.adapter",
    "ExportReport": "chainlora.adapter",
    "AutoChainSchedule": "chainlora.schedules",
}

__all__ = [
    "AutoChainSchedule",
    "ChainOfLoRACallback",
    "ChainSchedule",
    "ExportReport",
    "KnotError",
    "KnotRecord",
    "TiedLink",
    "export_adapter",
    "export_run_adapter",
    "merge_chain",
    "tie_knot",
]

if TYPE_CHECKING:
    from chainlora.adapter import ExportReport, export_adapter, export_run_adapter
    from chainlora.callback import ChainOfLoRACallback
    from chainlora.chain import KnotRecord, merge_chain, tie_knot
    from chainlora.errors import KnotError
    from chainlora.links import TiedLink
    from chainlora.schedules import AutoChainSchedule, ChainSchedule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chainlora' has no attribute {name!r}")
