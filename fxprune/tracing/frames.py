"""Which frames of a stack or traceback are the user's: what a message names as the line to look at."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch

__all__ = ["user_frames", "user_line", "last_user_line"]


def _library_dirs() -> tuple[Path, ...]:
    """The installed folders of fxprune, torch and (when loaded) typer: frames there are not the user's. By
    their real directories, not by names in the path: a user's project folder may be called fxprune or torch."""
    package = Path(__file__).resolve().parents[1]  # fxprune/, by this file's place in it
    modules = [torch] + [sys.modules[m] for m in ("typer", "click") if m in sys.modules]
    return (package, *(Path(m.__file__).resolve().parent for m in modules))


def user_frames(frames: list[Any]) -> list[Any]:
    """The frames (``traceback.FrameSummary``) that are the user's: outside fxprune, torch and the command
    line's library, and not code torch generated (``<eval_with_key>``)."""
    libraries = _library_dirs()

    def users(filename: str) -> bool:
        if filename.startswith("<"):
            return False
        path = Path(filename).resolve()
        return not any(path.is_relative_to(d) for d in libraries)

    return [f for f in frames if users(f.filename)]


def last_user_line(frames: list[Any]) -> str:
    """The deepest of ``frames`` that is the user's, as ``file:line: code``; "" when none is."""
    mine = user_frames(frames)
    if not mine:
        return ""
    f = mine[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def user_line(exc: BaseException) -> str:
    """The deepest traceback frame that is the user's (``user_frames``): the user's line that failed."""
    return last_user_line(traceback.extract_tb(exc.__traceback__))
