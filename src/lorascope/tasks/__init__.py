"""Tasks, registered by name. Each module defines a subclass of `Task` and registers it."""

from lorascope.tasks import mrpc as _mrpc  # noqa: F401  (registers "mrpc")
from lorascope.tasks import squad_v2 as _squad_v2  # noqa: F401  (registers "squad_v2")
from lorascope.tasks.base import TASKS, Example, Task, get_task

__all__ = ["TASKS", "Example", "Task", "get_task"]
