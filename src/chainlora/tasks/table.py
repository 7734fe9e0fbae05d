"""The task table of ``chainlora tasks``: every registered task, its metric, and where its data resolves."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from chainlora.errors import DataError
from chainlora.tasks.base import Pool, Task
from chainlora.tasks.data import DataSource, read_pools, read_rows, resolve_source
from chainlora.tasks.registry import TASKS


@dataclass(frozen=True)
class TaskInfo:
    """One row of the task table."""

    name: str
    kind: str
    metric: str
    objective: str
    status: str  # real / partial / substitute / user data only
    source: str  # where the data was found, or why not
    sizes: dict[Pool, int] | None  # rows per pool; None when unknown (hub) or no data
    licence: str
    note: str


def list_tasks(
    *, data_dir: str | os.PathLike[str] | None = None, allow_hub: bool | None = False
) -> list[TaskInfo]:
    """Every registered task with where its data resolves (``data_dir``, ``CHAINLORA_DATA``, packages) and row
    counts; nothing is downloaded."""
    infos = []
    for task in TASKS.values():
        try:
            source = resolve_source(task, data_dir=data_dir, allow_hub=allow_hub)
            where, sizes = source.description, _count_rows(task, source)
        except DataError:
            where, sizes = (
                "not found (" + ("see substitutes" if task.substitutes else "bring --data") + ")",
                None,
            )
        infos.append(
            TaskInfo(
                task.name,
                task.kind,
                task.metric,
                task.objective,
                task.status,
                where,
                sizes,
                task.licence,
                task.note,
            )
        )
    return infos


def _count_rows(task: Task, source: DataSource) -> dict[Pool, int] | None:
    if source.kind == "hub":
        return None
    if source.kind == "package":
        return {pool: len(rows) for pool, rows in read_pools(task, source).items()}
    return {pool: _rows_in_file(task, path) for pool, path in source.files.items()}


def _rows_in_file(task: Task, path: Path) -> int:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return sum(1 for _ in csv.DictReader(handle))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return len(read_rows(task, path))


def print_tasks_table(
    file: TextIO | None = None, *, data_dir: str | os.PathLike[str] | None = None
) -> list[TaskInfo]:
    """Print the task table (for ``chainlora tasks``) and return its rows."""
    infos = list_tasks(data_dir=data_dir)
    header = ("task", "kind", "metric", "status", "train", "test", "licence", "source")
    rows = [
        (
            info.name,
            info.kind,
            info.metric,
            info.status,
            str(info.sizes.get("train", "-")) if info.sizes else "-",
            str(info.sizes.get("test", "-")) if info.sizes else "-",
            info.licence,
            info.source,
        )
        for info in infos
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    out = file or sys.stdout
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1],
            file=out,
        )
    notes = [f"  {info.name}: {info.note}" for info in infos if info.note]
    if notes:
        print("notes:", *notes, sep="\n", file=out)
    return infos
