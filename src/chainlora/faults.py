"""The crash hook: die by SIGKILL at a named point of a run, to prove that nothing is lost (tests only).

Set ``CHAINLORA_FAULT=<point>:<n>`` and the process kills itself (``SIGKILL``: no ``finally``, no ``atexit``,
no flush, exactly like the OOM killer or a pre-empted node) the ``n``-th time it reaches ``point``. Unset (the
normal case) :func:`maybe_crash` is one dictionary lookup. The points (one call each):

    mid_step          after the forward/backward of a micro-batch, before the optimizer update (recipes/trainer.py)
    after_knot        right after a knot is tied, before anything about it is saved (callback.py)
    atomic_write      inside every atomic file/folder write, the temp complete but not yet renamed (io.py)
    checkpoint_write  a checkpoint fully written by the Trainer and the callbacks, its seal not (rundir.py)
    final_export      final/ written to its temp folder, not yet renamed into place (rundir.py)

The harness that runs the CLI with a fault set, many times and fast, is ``chainlora.testing.faults``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

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


def reset() -> None:
    """Forget how often each point was reached (a process about to run with a new ``$CHAINLORA_FAULT``)."""
    _reached.clear()
