"""Quiet tracing without silencing anyone else.

* ``ThreadHeldStream``: holds back what one thread writes to ``sys.stderr`` (torch.export prints a page of
  partial graph when it fails; where fxprune handles the failure, that page is noise). Shared by the command
  line and the API.
* ``torch_trace_noise_ignored``: ignores the warnings torch itself raises while fxprune traces (the table
  ``TRACE_NOISE``, by category and message), and nothing else. Python's warning filters are process-wide: a
  blanket ``simplefilter("ignore")`` would also swallow the user's own warnings raised in ``forward`` and
  every other thread's for as long as a trace runs.
"""
from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["ThreadHeldStream", "TRACE_NOISE", "torch_trace_noise_ignored"]

# (category, message regex, module regex) of the warnings torch raises about fxprune's own tracing, not about
# the user's model: ``warnings.filterwarnings`` arguments. Measured on torchvision, timm and Hugging Face models.
TRACE_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # make_fx's graph reads parameters by state-dict name before they are attached as attributes
    (UserWarning, r"Failed to fetch module ", r"torch\.fx\."),
    (UserWarning, r"Attempted to insert a get_attr Node with no underlying reference", r"torch\.fx\."),
    # export of a model that caches tensors on itself in eval mode (timm's EfficientFormer, LeViT);
    # _python_state_kept puts the cache back
    (UserWarning, r"The tensor attributes? .* assigned during export", r""),
)


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


@contextlib.contextmanager
def torch_trace_noise_ignored() -> Iterator[None]:
    """Ignore the warnings of ``TRACE_NOISE`` inside the block; every other warning (the user's own, another
    thread's) is shown as usual. The filters in force before are restored after."""
    with warnings.catch_warnings():
        for category, message, module in TRACE_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield

