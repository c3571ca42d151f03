"""Embedded tasks with checkable answers, for the demo, the tests and offline evaluation.

``get_task("arithmetic", max_operand=20)`` returns a task object; see :class:`posttrain.tasks.base.Task`
for the dataset builders every task offers.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError
from posttrain.tasks.arithmetic import ArithmeticTask, extract_final_number
from posttrain.tasks.base import Task
from posttrain.tasks.tool_use import ToolUseEnv, ToolUseTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """The task registered as ``name``, built with ``kwargs`` (e.g. ``max_operand=20``)."""
    task_class = TASKS.get(name)
    if task_class is None:
        raise ConfigError(f"unknown task {name!r}", field="task", fix=f"use one of: {', '.join(sorted(TASKS))}")
    try:
        return task_class(**kwargs)
    except TypeError as error:  # an unknown keyword: say which task and which options exist
        raise ConfigError(f"task {name!r} does not accept these options ({error})", field="task",
                          fix=f"see help({task_class.__name__})") from None


# ToolUseTask is not in TASKS: its answers need the tools run (posttrain.eval.tool_use), which the
# single-turn `posttrain eval --task` does not do
__all__ = ["TASKS", "ArithmeticTask", "Task", "ToolUseEnv", "ToolUseTask", "extract_final_number", "get_task"]
