"""actsel: do a language model's activations tell which in-context examples are worth using?"""

import logging

from actsel.models import DEFAULT_MODEL, list_models, load_model
from actsel.prompts import Batch, Prompt, PromptBuilder, build_prompt, collate
from actsel.tasks import Example, Task, list_tasks, load_task, load_task_from_files

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Batch", "Example", "Prompt", "PromptBuilder", "Task", "build_prompt", "collate",
    "list_models", "list_tasks", "load_model", "load_task", "load_task_from_files",
]
