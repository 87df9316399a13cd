"""Training: the reference loop, hooks, checkpoints, and method-specific training pieces."""

from tensorslim.train.distill import distill
from tensorslim.train.hooks import TrainHook, unwrap
from tensorslim.train.loop import History, evaluate, fit

__all__ = ["History", "TrainHook", "distill", "evaluate", "fit", "unwrap"]
