"""Tasks: candidate pools, evaluation splits and their text templates."""

from actsel.tasks.base import Example, Task
from actsel.tasks.files import load_task_from_files, task_from_rows
from actsel.tasks.registry import list_tasks, load_task

__all__ = ["Example", "Task", "list_tasks", "load_task", "load_task_from_files", "task_from_rows"]
