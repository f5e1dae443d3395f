"""The one training engine: recovery after pruning and every pass that trains.

    engine.py       train(): the loop, optimisers, schedules, AMP, clipping, evaluation, checkpoints
    modes.py        recover(): finetune / scratch-e / scratch-b, distillation, re-initialisation
    checkpoint.py   pickle-free checkpoints (.safetensors + .json)
    resume.py       checkpoints_in(): every training of a run checkpoints and resumes (a killed run continues)
    curves.py       the per-epoch JSON-lines log and its training-curve PNG
    distributed.py  data-parallel under torchrun (DDP, sharded loaders, rank-0 writes)
"""
from .curves import plot_log, read_log
from .engine import Hook, TrainState, finetune, load_weights, train
from .modes import DistillHook, recover, reinitialize, scratch_b_epochs
from .resume import checkpoints_in

__all__ = ["train", "finetune", "Hook", "TrainState", "recover", "reinitialize", "scratch_b_epochs",
           "DistillHook", "load_weights", "plot_log", "read_log", "checkpoints_in"]
