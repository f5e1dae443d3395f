"""The one training engine: recovery after pruning and, later, every pass that trains."""
from .engine import Hook, TrainState, finetune, train

__all__ = ["train", "finetune", "Hook", "TrainState"]
