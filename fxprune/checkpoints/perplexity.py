"""Perplexity of a decoder-only language model folder on a text file, run from disk one decoder layer at a time
(``fxprune.checkpoints.stream``): a model larger than memory can be measured. ``fxprune eval DIR --text FILE``,
and ``fxprune run DIR --eval-text FILE`` before and after pruning.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from .folder import Checkpoint
from .stream import DecoderStream
from .text import EVAL_LENGTH, text_windows

__all__ = ["perplexity"]


def perplexity(folder: str | Path | Checkpoint, text: str | Path, length: int = EVAL_LENGTH,
               windows: int | None = None, skip: tuple[int, ...] = ()) -> dict[str, Any]:
    """Next-token perplexity and bits per byte on ``text``'s first ``windows`` (None: all) whole windows of
    ``length`` tokens; ``skip``: decoder layers passed over (what removing them would cost)."""
    t0 = time.perf_counter()
    ckpt = folder if isinstance(folder, Checkpoint) else Checkpoint(folder)
    w = text_windows(ckpt, text, length, windows)
    result = DecoderStream(ckpt).run(w.batches, skip=skip, tail=True)
    return {"perplexity": result.perplexity, "bits_per_byte": result.nll / math.log(2) / max(sum(w.nbytes), 1),
            "tokens": result.predicted, "windows": sum(len(b) for b in w.batches), "length": length,
            "text": str(text), "tokenizer": w.tokenizer, "peak_loaded_bytes": result.peak_loaded_bytes,
            "seconds": round(time.perf_counter() - t0, 3)}
