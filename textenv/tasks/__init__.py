"""The embedded tasks: offline prompt distributions, demonstrations and gold rewards.

``TASKS`` maps each name to its `Task`; see each class's docstring for its spec.
"""

from __future__ import annotations

from textenv.tasks.arithmetic import ArithmeticTask
from textenv.tasks.base import SPLITS, Task
from textenv.tasks.commongen import CommonGenTask
from textenv.tasks.sentiment import SentimentTask

__all__ = ["TASKS", "SPLITS", "Task", "SentimentTask", "ArithmeticTask", "CommonGenTask", "get_task"]

TASKS: dict[str, Task] = {task.name: task for task in (SentimentTask(), ArithmeticTask(), CommonGenTask())}


def get_task(name: str) -> Task:
    """The embedded task called ``name``; ValueError listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
