"""Run ``chainlora`` commands the way the fault tests need: forked, fast, and killable at a named point.

:func:`run_cli` runs ``chainlora.cli.main`` in a process forked from a pre-imported server (seconds instead of
a fresh interpreter's imports), with ``$CHAINLORA_FAULT`` set for that process only (``chainlora.faults``), so
a test can kill a real run at any point and resume it, many times.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from chainlora import faults


def _child(argv: Sequence[str], fault: str | None, log: str | None) -> None:
    """Body of a :func:`run_cli` process: one thread, optional fault, output to ``log``; exits with main's code."""
    import sys

    import torch

    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    torch.set_num_threads(1)
    os.environ.pop(faults.ENV, None)
    if fault:
        os.environ[faults.ENV] = fault
    faults.reset()
    from chainlora.cli import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PRELOAD = ["chainlora.cli", "chainlora.recipes.train", "chainlora.tasks", "peft", "transformers"]


def start_cli(argv: Sequence[str], *, fault: str | None = None, log: str | None = None):
    """Start ``chainlora <argv>`` in a forked process (a ``multiprocessing`` forkserver that imported
    chainlora, torch and transformers once) and return the ``multiprocessing.Process``; its ``exitcode``
    is ``-9`` when it was SIGKILLed. ``fault`` is a ``CHAINLORA_FAULT`` value for that process only."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    process = context.Process(target=_child, args=(list(argv), fault, log), daemon=True)
    process.start()
    return process


def run_cli(
    argv: Sequence[str], *, fault: str | None = None, log: str | None = None, timeout: float = 300
) -> int:
    """Run :func:`start_cli` to the end and return its exit code (``-9``: killed by a fault)."""
    process = start_cli(argv, fault=fault, log=log)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"chainlora {' '.join(argv)} did not finish in {timeout} s")
    return process.exitcode
