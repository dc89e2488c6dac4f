"""Training tasks: what a kind of training builds, draws and minimises (genvis.registry.TASKS).

The loop (genvis/training/loop.py) knows Accelerate, accumulation, optimizers, clipping, the
non-finite guard, EMA, checkpoints, logging, previews and export; a task knows its models and
losses. A new family is a new task file registered in TASKS (or an existing task it fits).
"""
from genvis.training.tasks.base import DataInfo, OptimizerSpec, Task

__all__ = ["DataInfo", "OptimizerSpec", "Task"]
