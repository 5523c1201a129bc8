"""Tasks and input pipelines. A task makes batches of numpy arrays, each batch a
pure function of (seed, batch index), so that any batch is reproducible, resume is
exact and every process can make just its own rows of the global batch."""

from ssm.data.tasks import TASKS, Task, make_task

__all__ = ["TASKS", "Task", "make_task"]
