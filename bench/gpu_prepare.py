"""Gather what ``bench/gpu_suite.py`` needs on a GPU machine without network into ``.carry/``, and print the calls.

    python bench/gpu_prepare.py [--data-dir DIR]     # here, once; then make the printed calls back to back

The GPU machine (the device tool) receives a copy of the checkout plus the ignored folders a call names in
``carry``, at most 64 MiB per call all together, and keeps ignored files from one call to the next only while
it stays warm (30 s after a call). Its image has torch, accelerate and most of what chainlora imports, but no
model, no network and an older transformers. So this writes, under ``.carry/`` (ignored by ``.gitignore``):

* ``call<i>/model/``: the bundled model's GGUF (SmolLM2-135M-Instruct Q4_1, 98 MB, sha256-pinned by
  ``chainlora.models``, from its installed PyPI package) cut into pieces, one per call, and ``manifest.json``
  (the pieces in order); ``gpu_suite.py`` joins them, checks the sha256 and converts the model with
  ``chainlora.models.convert_gguf``;
* in the last call's folder: ``wheels/``, the pure-Python wheels that the image lacks or has at another version
  (``WHEELS``, at the versions installed here, from PyPI), and ``data/``, the first rows of the task files the
  suite reads (SST-2, BoolQ, COPA, CB; from ``--data-dir``);

sizing every call's folder so that it fits beside the checkout, and writes ``calls.json``: the calls in order
(each but the last only brings its piece; the last installs the wheels and runs the suite).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20  # what one device call may carry, working tree included
MARGIN_BYTES = 2**20  # files the checkout may gain before the call (results, logs)
MODEL = "smollm2-135m"
# Missing from the GPU image (gguf: the model's file format; jsonargparse[signatures], platformdirs: the CLI), or
# there at another version than pyproject.toml pins (transformers 5.17 there, peft)
WHEELS = (
    "transformers",
    "peft",
    "gguf",
    "jsonargparse",
    "docstring-parser",
    "typeshed-client",
    "platformdirs",
)
DATA_ROWS = {"sst2": 8000, "boolq": 1000, "copa": 1000, "cb": 1000}  # first rows of each file of each task
SUITE_TIMEOUT_S = 600  # the last call: the suite's 480 s budget, its start-up and the wheels' install


def find_gguf(name: str = MODEL) -> tuple[Path, dict[str, Any]]:
    """The GGUF of registry model ``name`` in its installed package (found, not imported), and its entry."""
    from chainlora.models import REGISTRY

    entry = REGISTRY[name]
    (part,) = entry.gguf_parts
    module, rel = part.split("/", 1)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{entry.package} is not installed: {entry.pip_command} (scripts/setup.sh does it)")
    return Path(spec.submodule_search_locations[0]) / rel, {"file": Path(rel).name, "sha256": entry.sha256}


def download_wheels(folder: Path, names: tuple[str, ...] = WHEELS) -> None:
    """Wheels of ``names`` at the versions installed here (``pip download --no-deps``, for the GPU image's
    CPython 3.12), into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    pip += ["--python-version", "3.12", "--implementation", "cp", "-d", str(folder), *pins]
    subprocess.run(pip, check=True)


def copy_data(source: Path, folder: Path) -> None:
    """The first ``DATA_ROWS`` rows of each split file of each task, from ``source/<task>/`` to ``folder``."""
    for task, rows in DATA_ROWS.items():
        files = sorted((source / task).glob("*.jsonl"))
        if not files:
            raise SystemExit(
                f"no {source / task}/*.jsonl: pass --data-dir (a folder of <task>/<split>.jsonl)"
            )
        (folder / task).mkdir(parents=True, exist_ok=True)
        for file in files:
            with open(file) as src:
                lines = [line for _, line in zip(range(rows), src, strict=False)]
            (folder / task / file.name).write_text("".join(lines))


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the checkout that every call sends: tracked and untracked-not-ignored files."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    files = [root / os.fsdecode(name) for name in listing.split(b"\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def piece_sizes(model_bytes: int, extra_bytes: int, budget: int) -> list[int]:
    """Sizes of the model's pieces, one per call, each call within ``budget``; the last call also carries
    ``extra_bytes`` (wheels, data). A last piece of 0 bytes: that call carries the extras alone."""
    if extra_bytes > budget:
        raise SystemExit(f"wheels and data take {extra_bytes / 2**20:.1f} MiB, more than a call may carry")
    sizes, left = [], model_bytes
    while left + extra_bytes > budget:
        sizes.append(min(left, budget))
        left -= sizes[-1]
    return [*sizes, left]


def split_model(gguf: Path, dest: Path, sizes: list[int], info: dict[str, Any]) -> list[Path]:
    """Cut ``gguf`` into pieces of ``sizes``, piece i into ``dest/call<i+1>/model/``, the manifest in each;
    returns the call folders in the order the calls must be made."""
    folders = [dest / f"call{i + 1}" for i in range(len(sizes))]
    pieces = []
    with open(gguf, "rb") as src:
        for i, (folder, size) in enumerate(zip(folders, sizes, strict=True)):
            (folder / "model").mkdir(parents=True, exist_ok=True)
            if size:
                piece = folder / "model" / f"{info['file']}.part{i}"
                piece.write_bytes(src.read(size))
                pieces.append(str(piece.relative_to(dest)))
    for folder in folders:
        (folder / "model" / "manifest.json").write_text(
            json.dumps({**info, "pieces": pieces}, indent=1) + "\n"
        )
    return folders


def calls(dest: Path, folders: list[Path]) -> list[dict[str, Any]]:
    """The device calls, in order: the first ones bring a piece each; the last installs the wheels and runs
    the suite, its output under ``$OUT`` (``gpu_suite.json``, ``gpu_suite.md``, the log)."""
    carry = str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else str(dest)
    rel = [str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in folders]
    bring = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; ls -l {}/model"
    out = [{"carry": [folder], "timeout_s": 120, "command": bring.format(folder)} for folder in rel[:-1]]
    command = "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    command += (
        f"--target /tmp/site {rel[-1]}/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1; "
    )
    command += f"set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --out $OUT --carry {carry} "
    command += "2>&1 | tee $OUT/gpu_suite.log"
    return [*out, {"carry": [rel[-1]], "timeout_s": SUITE_TIMEOUT_S, "command": command}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".carry", help="the ignored folder to fill")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CHAINLORA_DATA") or ROOT.parent / "shared" / "data"),
        help="task data (<task>/<split>.jsonl); default $CHAINLORA_DATA, else ../shared/data",
    )
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    shutil.rmtree(dest, ignore_errors=True)  # a fresh set: no piece of another split may linger
    staging = dest / "staging"  # wheels and data, for the last call
    download_wheels(staging / "wheels")
    copy_data(args.data_dir, staging / "data")
    gguf, info = find_gguf()
    tree = tree_bytes()
    sizes = piece_sizes(gguf.stat().st_size, folder_bytes(staging), LIMIT_BYTES - tree - MARGIN_BYTES)
    folders = split_model(gguf, dest, sizes, info)
    for name in ("wheels", "data"):
        (staging / name).rename(folders[-1] / name)
    staging.rmdir()
    plan = calls(dest, folders)
    (dest / "calls.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(
        f"{gguf} ({gguf.stat().st_size / 2**20:.1f} MiB) in {len(folders)} piece(s); checkout {tree / 2**20:.1f} MiB"
    )
    for i, (folder, call) in enumerate(zip(folders, plan, strict=True), 1):
        size = (tree + folder_bytes(folder)) / 2**20
        print(
            f"\n{i}. carry {call['carry']} ({size:.1f} MiB with the checkout), timeout_s {call['timeout_s']}:"
        )
        print(f"   {call['command']}")
    print(
        f"\nThe calls, also in {dest / 'calls.json'}, back to back: a piece survives only while the machine is warm."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
