"""Test-only fault injection: die by SIGKILL at a named point of a run, to prove that nothing is lost.

Set ``CHAINLORA_FAULT=<point>:<n>`` and the process kills itself (``SIGKILL``: no ``finally``, no ``atexit``,
no flush, exactly like the OOM killer or a pre-empted node) the ``n``-th time it reaches ``point``. Unset (the
normal case) :func:`maybe_crash` is one dictionary lookup. The points (one call each):

    mid_step          after the forward/backward of a micro-batch, before the optimizer update (train.py)
    after_knot        right after a knot is tied, before anything about it is saved (callback.py)
    atomic_write      inside every atomic file/folder write, the temp complete but not yet renamed (io.py)
    checkpoint_write  a checkpoint fully written by the Trainer and the callbacks, its completion marker not (train.py)
    final_export      final/ written to its temp folder, not yet renamed into place (train.py)

:func:`run_cli` runs ``chainlora.cli.main`` in a process forked from a pre-imported server (seconds instead of
a fresh interpreter's imports), so fault tests can kill and resume a real run many times.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Sequence

ENV = "CHAINLORA_FAULT"
POINTS = ("mid_step", "after_knot", "atomic_write", "checkpoint_write", "final_export")

_reached: Counter[str] = Counter()


def maybe_crash(point: str) -> None:
    """SIGKILL this process if ``$CHAINLORA_FAULT`` is ``<point>:<n>`` and this is the n-th time here."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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
    os.environ.pop(ENV, None)
    if fault:
        os.environ[ENV] = fault
    _reached.clear()
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
