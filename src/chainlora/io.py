"""Atomic file and folder writes: a reader never sees a torn file, and a crash leaves only a temp to ignore.

Every write goes to a temporary name in the same folder, is flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX); the folder is fsync'ed so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chainlora.faults import maybe_crash

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under ``path`` (before it is renamed into place)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; once the block ends without error it replaces
    ``target`` atomically. On error the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        maybe_crash("atomic_write")
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; when the block succeeds it is fsync'ed and renamed to
    ``target`` (an existing ``target`` is replaced only with ``overwrite``). On error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        maybe_crash("atomic_write")
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(TEMP_PREFIX + target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def remove_temps(root: str | Path) -> list[Path]:
    """Delete every leftover temporary (``.tmp-*`` file or folder) under ``root``: what a killed write left
    behind. Only safe while no other process writes under ``root``. Returns what was removed."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if name.startswith(TEMP_PREFIX):
                path = Path(folder) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(TEMP_PREFIX)]
    return removed


def output_problem(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` (checked before any work, nothing created), or None: it is a
    folder, a parent of it is a file, or the nearest existing folder is not writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        return f"{path} is a folder"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
