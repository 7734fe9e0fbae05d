"""``chainlora export RUN_DIR --adapter [--rank R]``: a run's whole chain as one standard PEFT LoRA adapter.

The export itself is ``chainlora.adapter.export_run_adapter``; with ``--rank`` the full and the truncated adapter
are also scored on the run's own task and test draw (``chainlora.recipes.evaluate.score_adapters``).
"""

from __future__ import annotations

import json
from typing import Any

from chainlora.adapter import export_run_adapter
from chainlora.config import ExportConfig
from chainlora.recipes.evaluate import score_adapters


def export(config: ExportConfig) -> dict[str, Any]:
    """Write the adapter (``RUN_DIR/adapter``, or ``adapter-r{R}`` truncated to rank R) and return its report,
    with ``test_score`` of the full and the truncated adapter when a rank is asked and ``config.score``."""
    result = export_run_adapter(config.run_dir, rank=config.rank, out=config.out, overwrite=config.overwrite)
    if config.rank is not None and config.score:
        full = export_run_adapter(
            config.run_dir
        )  # the whole chain, uncompressed (adapter/; reused if present)
        result["test_score"] = score_adapters(
            config.run_dir, {"full": full["path"], f"rank {config.rank}": result["path"]}
        )
    return result


def export_command(config: ExportConfig) -> int:
    """``chainlora export``: export and print the report as JSON."""
    print(json.dumps(export(config), indent=2, default=str))
    return 0
