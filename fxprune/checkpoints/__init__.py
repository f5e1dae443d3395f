"""Hugging Face checkpoint folders in, Hugging Face checkpoint folders out, streamed from disk.

    folder.py        the folder: config, tensor table from the safetensors headers, reads slice by slice
    architecture.py  config.json -> the model class on the meta device, example inputs, tensor names
    widths.py        pruned widths as config.json fields, and the check that the config rebuilds them
    write.py         the pruned shards, written one at a time
    prune.py         the steps in order: ``prune_checkpoint``
"""
from __future__ import annotations

from .folder import Checkpoint, CheckpointError, is_checkpoint_folder
from .prune import CheckpointResult, prune_checkpoint

__all__ = ["prune_checkpoint", "CheckpointResult", "Checkpoint", "CheckpointError", "is_checkpoint_folder"]
