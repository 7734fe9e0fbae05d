"""Run ``chainlora`` commands the way the fault tests need: forked, fast, and killable at a named point.

:func:`run_cli` runs ``chainlora.cli.main`` in a process forked from a pre-imported server (seconds instead of
a fresh interpreter's imports), with ``$CHAINLORA_FAULT`` set for that process only (``chainlora.faults``), so
a test can kill a real run at any point and resume it, many times.

Killed from outside, at a precise moment: :func:`start_cli` with ``hold="module:function[:before|after][:n]"``
stops the process just before (or just after) the n-th call of that function and says so in the file ``held``;
:func:`kill_when` then sends it SIGKILL from the test's process, as the OOM killer would, at exactly that point
(``hold="chainlora.rundir:seal_checkpoint:after:4"``: right after the 4th checkpoint is sealed). Also
``file_size_limit``: the process cannot write a file larger than that many bytes (``RLIMIT_FSIZE``; the write
fails with ``EFBIG``, as a full disk fails it with ``ENOSPC``).

What a resumed run is held to: :func:`assert_same_weights` (its exported weights equal the uninterrupted run's)
and :func:`assert_finished_clean` (a finished run leaves no temporary file, checkpoint or best state behind).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chainlora import faults

RUN_WEIGHTS = (("final", "model.safetensors"), ("adapter", "adapter_model.safetensors"))


def _install_hold(spec: str, held: str) -> None:
    """Replace ``module.function`` so that the process writes ``held`` and sleeps (until killed) just before or
    just after its n-th call (``spec`` = ``module:function[:before|after][:n]``)."""
    import importlib
    import sys

    module_name, function_name, *rest = spec.split(":")
    when = rest[0] if rest and rest[0] in ("before", "after") else "before"
    nth = int(rest[-1]) if rest and rest[-1].isdigit() else 1
    module = importlib.import_module(module_name)
    real = getattr(module, function_name)
    calls = {"n": 0}

    def hold() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(held).write_text(spec)
        while True:
            time.sleep(60)

    def held_function(*args, **kwargs):
        calls["n"] += 1
        if when == "before" and calls["n"] == nth:
            hold()
        result = real(*args, **kwargs)
        if when == "after" and calls["n"] == nth:
            hold()
        return result

    setattr(module, function_name, held_function)


def _limit_file_size(limit: int) -> None:
    """Go on in a forked process that cannot write a file larger than ``limit`` bytes, its output going through a
    pipe to this one's (the log file must not count); this process only copies the output and exits with the
    other's exit code."""
    import resource
    import sys

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the limited process runs the command
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return
    os.close(write)
    while chunk := os.read(read, 1 << 16):
        os.write(1, chunk)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    sys.stdout.flush()
    os._exit(status if status >= 0 else 128 - status)


def _child(
    argv: Sequence[str],
    fault: str | None,
    log: str | None,
    hold: str | None = None,
    held: str | None = None,
    file_size_limit: int | None = None,
) -> None:
    """Body of a :func:`run_cli` process: one thread, optional fault, hold and file size limit, output to
    ``log``; exits with main's code."""
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
    if hold is not None:
        assert held is not None, "hold needs the path of its `held` file"
        _install_hold(hold, held)
    if file_size_limit is not None:
        _limit_file_size(file_size_limit)
    from chainlora.cli import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PRELOAD = ["chainlora.cli", "chainlora.recipes.train", "chainlora.tasks", "peft", "transformers"]


def start_cli(
    argv: Sequence[str],
    *,
    fault: str | None = None,
    log: str | None = None,
    hold: str | None = None,
    held: str | os.PathLike[str] | None = None,
    file_size_limit: int | None = None,
):
    """Start ``chainlora <argv>`` in a forked process (a ``multiprocessing`` forkserver that imported
    chainlora, torch and transformers once) and return the ``multiprocessing.Process``; its ``exitcode``
    is ``-9`` when it was SIGKILLed. ``fault`` is a ``CHAINLORA_FAULT`` value for that process only; ``hold``,
    ``held`` and ``file_size_limit`` are as in the module's docstring."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    args = (list(argv), fault, log, hold, None if held is None else str(held), file_size_limit)
    process = context.Process(target=_child, args=args, daemon=True)
    process.start()
    return process


def run_cli(
    argv: Sequence[str],
    *,
    fault: str | None = None,
    log: str | None = None,
    timeout: float = 300,
    file_size_limit: int | None = None,
) -> int:
    """Run :func:`start_cli` to the end and return its exit code (``-9``: killed by a fault)."""
    process = start_cli(argv, fault=fault, log=log, file_size_limit=file_size_limit)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"chainlora {' '.join(argv)} did not finish in {timeout} s")
    return process.exitcode


def kill_when(process, condition: Callable[[], bool], *, timeout: float = 300, poll: float = 0.002) -> bool:
    """SIGKILL ``process`` (from this process) as soon as ``condition()`` holds, and wait for it to end. Returns
    whether it was killed (False: it ended first); TimeoutError (after killing it) if ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while process.is_alive() and not condition():
        if time.monotonic() > deadline:
            process.kill()
            process.join()
            raise TimeoutError("the condition to kill at was never met")
        time.sleep(poll)
    killed = process.is_alive()
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.join(timeout)
    return killed


def run_until_held(argv: Sequence[str], hold: str, *, log: str | None = None, timeout: float = 300) -> Path:
    """Run ``chainlora <argv>`` until it reaches ``hold`` (see the module's docstring), SIGKILL it there from this
    process, and return the ``held`` file; AssertionError if the process ended without reaching it."""
    held = Path(log).with_suffix(".held") if log else Path(os.getcwd()) / f".held-{os.getpid()}"
    held.unlink(missing_ok=True)
    process = start_cli(argv, log=log, hold=hold, held=held)
    killed = kill_when(process, held.exists, timeout=timeout)
    tail = Path(log).read_text()[-3000:] if log else ""
    assert killed and process.exitcode == -signal.SIGKILL, f"{hold} was not reached:\n{tail}"
    return held


def assert_same_weights(
    run_dir: Path, reference: Path, files: Sequence[tuple[str, str]] = RUN_WEIGHTS[:1]
) -> None:
    """The safetensors ``files`` (folder, name) of ``run_dir`` hold the same tensors as ``reference``'s, equal to
    1e-6 relative (fp32; bit for bit in practice): a killed and resumed run against the uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    for folder, name in files:
        expected, got = load_file(Path(reference) / folder / name), load_file(Path(run_dir) / folder / name)
        assert expected.keys() == got.keys(), f"{folder}/{name}: different tensors"
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=f"{folder}/{key}")


def assert_finished_clean(run_dir: Path) -> None:
    """A finished run: ``metrics.json`` written; no ``.tmp-`` file, no ``checkpoints/`` and no ``best/`` left."""
    run_dir = Path(run_dir)
    assert (run_dir / "metrics.json").is_file(), f"{run_dir}: no metrics.json"
    leftovers = [str(p) for p in run_dir.rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers, f"temporary files left: {leftovers}"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "best").exists()
