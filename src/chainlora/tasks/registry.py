"""The task registry: every task of the suite by name."""

from __future__ import annotations

from chainlora.errors import ConfigError
from chainlora.tasks.base import Task
from chainlora.tasks.templates import ALL_TASKS

TASKS: dict[str, Task] = {task.name: task for task in ALL_TASKS}


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive); ``ConfigError`` listing the known names otherwise."""
    task = TASKS.get(name.lower())
    if task is None:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return task
