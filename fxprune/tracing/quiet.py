"""Holding back what one thread writes to ``sys.stderr`` (torch.export prints a page of partial graph when it
fails; where fxprune handles the failure, that page is noise). Shared by the command line and the API."""
from __future__ import annotations

import io
import threading
from typing import Any

__all__ = ["ThreadHeldStream"]


class ThreadHeldStream:
    """A text stream that buffers the writes of thread ``owner`` and passes every other write (and
    everything else) on to ``stream``."""

    def __init__(self, stream: Any, owner: int | None) -> None:
        self.stream = stream
        self.owner = owner
        self.buffer = io.StringIO()

    def _target(self) -> Any:
        return self.buffer if self.owner is not None and threading.get_ident() == self.owner else self.stream

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines: Any) -> None:
        self._target().writelines(lines)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
