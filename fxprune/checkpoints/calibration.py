"""The text a language model folder is calibrated and measured on: ``--calib FILE.txt`` (the activations a pass
reads, streamed layer by layer from disk) and ``--eval-text FILE.txt`` (perplexity before and after pruning).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .folder import Checkpoint
from .stream import DecoderStream, Hook, LayerRun
from .text import CALIB_LENGTH, CALIB_WINDOWS, Windows, text_windows

__all__ = ["TextData", "Calibration", "Spilled"]


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

    def __call__(self, hooks: Mapping[str, Hook], after_layer: Callable[[str, nn.Module], None] | None = None) -> None:
        """``PassContext.calibrate``: the text through the model once, with ``hooks`` on their modules and
        ``after_layer(prefix, layer)`` once each decoder layer has run (its tensors still loaded)."""
        self.timed(lambda: self.stream.run(self.windows.batches, hooks, after_layer=after_layer))

    def rewrite(self, edit: Callable[[LayerRun], Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
        """``PassContext.calibrate.rewrite``: the text through the model layer by layer while ``edit`` rewrites
        each layer (``DecoderStream.rewrite``); the new tensors, spilled to disk as they come (memory stays one
        layer's), by model name."""
        spilled = Spilled()
        self.timed(lambda: [spilled.put(name, t) for name, t in self.stream.rewrite(self.windows.batches, edit)])
        return spilled

    def timed(self, run: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = run()
        self.info["seconds"] = round(self.info["seconds"] + time.perf_counter() - t0, 3)
        self.info["passes"] += 1
        self.info["peak_loaded_bytes"] = max(self.info.get("peak_loaded_bytes", 0), self.stream.peak)
        return result


class Spilled(Mapping[str, torch.Tensor]):
    """Tensors kept in a temporary folder, one safetensors file each, read back on access (the folder goes
    with the object)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fxprune-spill-")
        self._files: dict[str, Path] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = Path(self._dir.name) / f"{len(self._files)}.safetensors"
        save_file({"t": tensor.detach().contiguous().cpu()}, str(path))
        self._files[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self._files[name]))["t"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
