"""The text a language model folder is calibrated and measured on: ``--calib FILE.txt`` (the activations a pass
reads, streamed layer by layer from disk) and ``--eval-text FILE.txt`` (perplexity before and after pruning).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folder import Checkpoint
from .stream import DecoderStream, Hook
from .text import CALIB_LENGTH, CALIB_WINDOWS, Windows, text_windows

__all__ = ["TextData", "Calibration"]


@dataclass(frozen=True)
class TextData:
    """Calibration text (``calib``: ``samples`` windows of ``length`` tokens) and the text perplexity is
    measured on (``eval_text``: every whole window of ``length`` tokens)."""

    calib: str | Path | None = None
    eval_text: str | Path | None = None
    samples: int = CALIB_WINDOWS
    length: int = CALIB_LENGTH


class Calibration:
    """A folder's calibration text, tokenised once, run through the model from disk as often as asked; what it
    did goes into report.json (``info``)."""

    def __init__(self, ckpt: Checkpoint, text: TextData) -> None:
        assert text.calib is not None
        self.ckpt, self.text = ckpt, text
        self._windows: Windows | None = None
        self._stream: DecoderStream | None = None
        self.info: dict[str, Any] = {"text": str(text.calib), "seconds": 0.0, "passes": 0}

    @property
    def windows(self) -> Windows:
        if self._windows is None:
            self._windows = text_windows(self.ckpt, self.text.calib, self.text.length, self.text.samples)
            self.info.update(sequences=sum(len(b) for b in self._windows.batches), length=self.text.length,
                             tokens=self._windows.tokens, tokenizer=self._windows.tokenizer)
        return self._windows

    @property
    def stream(self) -> DecoderStream:
        if self._stream is None:
            self._stream = DecoderStream(self.ckpt)
        return self._stream

    def __call__(self, hooks: Mapping[str, Hook]) -> None:
        """``PassContext.calibrate``: the text through the model once, with ``hooks`` on their modules."""
        self.timed(lambda: self.stream.run(self.windows.batches, hooks))

    def timed(self, run: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = run()
        self.info["seconds"] = round(self.info["seconds"] + time.perf_counter() - t0, 3)
        self.info["passes"] += 1
        self.info["peak_loaded_bytes"] = max(self.info.get("peak_loaded_bytes", 0), self.stream.peak)
        return result
