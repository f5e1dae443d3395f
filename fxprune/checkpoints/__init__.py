"""Hugging Face checkpoint folders in, Hugging Face checkpoint folders out, streamed from disk.

    folder.py        the folder: config, tensor table from the safetensors headers, reads slice by slice
    architecture.py  config.json -> the model class on the meta device, example inputs, tensor names
    widths.py        pruned widths as config.json fields, and the check that the config rebuilds them
    write.py         the pruned shards, written one at a time
    text.py          a text file as windows of token ids (the folder's tokenizer, or UTF-8 bytes)
    stream.py        a decoder-only language model run one decoder layer at a time from the shards
    calibration.py   the calibration text (--calib) and the text perplexity is measured on (--eval-text)
    perplexity.py    perplexity and bits per byte, streamed
    depth.py         whole decoder blocks scored (block influence, perplexity) and removed, renumbered
    experts.py       routed experts of a mixture of experts counted on the text and removed, or narrowed
    biases.py        new bias tensors (act's compensation) and the config flags that create them
    units.py         whole units removed (blocks, experts, neurons): how many, and which
    steps.py         what every folder run shares: the stages' clock, the notes, the perplexity before/after
    prune.py         the steps in order: ``prune_checkpoint``
"""
from __future__ import annotations

from .calibration import TextData
from .depth import DepthResult
from .folder import Checkpoint, CheckpointError, is_checkpoint_folder
from .perplexity import perplexity
from .prune import CheckpointResult, prune_checkpoint

__all__ = ["prune_checkpoint", "CheckpointResult", "DepthResult", "Checkpoint", "CheckpointError",
           "is_checkpoint_folder", "TextData", "perplexity"]
