"""``fxprune run``'s work folder: a run killed part-way continues where it stopped when the same command runs again.

``OUT.resume/`` beside the output folder holds ``run.json`` (the run's description: every option of the
command, the model file's SHA-256, the fxprune and torch versions) and one ``train-N/`` checkpoint folder per
training of the run, in order (``fxprune.recovery.checkpoints_in``). Rerunning the same description replays
the stages, fast-forwards each finished training from its last checkpoint, continues the interrupted one
from its last finished epoch, and ends on the weights an uninterrupted run ends on. Another description (an
option changed, the model file edited) starts over. The folder is created when the first training starts,
and removed when the run has written its output, or fails before anything was trained.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RUN_JSON = "run.json"
SUFFIX = ".resume"

__all__ = ["work_folder", "description", "resumable", "RUN_JSON"]


def work_folder(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f"{out.name}{SUFFIX}"


def description(cfg: Any) -> dict[str, Any]:
    """What makes two runs the same run: every option but where the output goes, whether it may be replaced,
    and whether to resume; the model file's content; the versions that compute it."""
    import torch

    import fxprune

    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "force", "resume")}
    model_file = Path(cfg.model_file).resolve()
    return json.loads(json.dumps({
        "fxprune": fxprune.__version__, "torch": torch.__version__, "model_file": str(model_file),
        "model_file_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(), "options": options,
    }, default=str))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _has_checkpoint(work: Path) -> bool:
    return any(work.glob("train-*/last.json"))


@contextlib.contextmanager
def resumable(cfg: Any, note: Callable[[str], None]) -> Iterator[None]:
    """Run the block with its trainings checkpointed in ``OUT.resume`` (see the module docstring); ``note``
    receives what happened to an existing work folder."""
    from fxprune.recovery import checkpoints_in
    from fxprune.recovery.distributed import launch_world

    if launch_world() > 1:  # ranks would race on one folder; torchrun runs start over
        yield
        return
    work, want = work_folder(cfg.out), description(cfg)
    if work.exists():
        if not cfg.resume:
            shutil.rmtree(work)
        elif _read(work / RUN_JSON) != want:
            shutil.rmtree(work)
            note(f"{work} held the state of another run (other options, model file or versions): started over")
        elif _has_checkpoint(work):
            note(f"resumed from {work}: finished trainings are replayed from their checkpoints, an interrupted "
                 "one continues from its last finished epoch (--no-resume starts over)")

    def first_use(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_JSON).write_text(json.dumps(want, indent=1))

    done = False
    try:
        with checkpoints_in(work, first_use):
            yield
        done = True
    finally:
        if done or not _has_checkpoint(work):
            shutil.rmtree(work, ignore_errors=True)
