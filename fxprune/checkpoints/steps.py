"""What every run on a folder shares, whichever pass: the clock of its stages, the notes its warnings become,
and the perplexity measured before and after.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .calibration import TextData
from .folder import Checkpoint

__all__ = ["Clock", "recorded_notes", "measure_perplexity"]


class Clock:
    """Seconds per stage (report.json's ``seconds``), and ``progress`` told as each stage starts."""

    ORDER = ("read", "trace", "analyze", "score", "select", "write")

    def __init__(self, progress: Callable[[str], None] | None, order: tuple[str, ...] = ORDER) -> None:
        self.t0, self.progress, self.timings = time.perf_counter(), progress or (lambda name: None), {}
        self.ORDER = order
        self.progress(self.ORDER[0])

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t0 - sum(self.timings.values()), 3)
        if name != self.ORDER[-1]:
            self.progress(self.ORDER[self.ORDER.index(name) + 1])

    def seconds(self) -> dict[str, float]:
        return dict(self.timings, total=round(time.perf_counter() - self.t0, 3))


@contextlib.contextmanager
def recorded_notes() -> Iterator[list[str]]:
    """The fxprune warnings issued inside, as a list of notes (for report.json); each warning is issued again on
    the way out, so that callers (the command line's notes, pytest.warns) see it as if nothing caught it."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            notes.extend(dict.fromkeys(str(w.message).removeprefix("fxprune: ") for w in caught
                                       if str(w.message).startswith("fxprune: ")))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def measure_perplexity(report: dict[str, Any], ckpt: Checkpoint, written: Path, text: TextData,
                       loadable: bool) -> None:
    """report.json's ``perplexity``: the source folder's and the written one's on ``text.eval_text``."""
    if text.eval_text is None:
        return
    from .perplexity import perplexity

    if text.calib is not None and Path(text.eval_text).resolve() == Path(text.calib).resolve():
        warnings.warn("fxprune: the perplexity is measured on the calibration text: give --eval-text a held-out "
                      "file for a fair number", stacklevel=2)
        report.setdefault("notes", []).append("perplexity measured on the calibration text")
    before = perplexity(ckpt, text.eval_text, text.length)
    after = perplexity(written, text.eval_text, text.length) if loadable else None
    report["perplexity"] = {"before": before, "after": after}
