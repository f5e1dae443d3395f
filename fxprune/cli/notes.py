"""What a run tells the user besides its figures: fxprune's warnings as notes of report.json, and the checks that
add a note (a budget that fell short, a latency promise the device may not keep, a metric that dropped)."""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fxprune.selection.diagnose import removable_fraction, shortfall
from fxprune.tracing.quiet import ThreadHeldStream

from .runconfig import Feedback, RunConfig

DROP_POINTS = 0.03   # a metric in [0, 1] that fell by more than this (3 points) gets a line saying how to recover
FINAL_POINTS = 0.02  # after recovery: the final metric more than this (2 points) below the original's gets a line


def note(fb: Feedback, notes: list[str], text: str) -> None:
    notes.append(text)
    fb.note(text)


@contextlib.contextmanager
def warnings_as_notes(fb: Feedback, notes: list[str]) -> Iterator[None]:
    """fxprune's own warnings while pruning (a budget it cannot meet, sparsity training that ran out of
    epochs, a rewrite that kept groups whole) become notes: printed as such and kept in report.json.
    Warnings from elsewhere (torch, the user's code) pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if _ours(w.filename):
            text = str(w.message).removeprefix("fxprune: ")
            if text not in notes:
                note(fb, notes, text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _ours(filename: str) -> bool:
    """A warning issued from fxprune's own code (its built-in passes included)."""
    root = sys.modules[__package__.partition(".")[0]]  # fxprune itself, not only fxprune.cli
    return Path(filename).resolve().is_relative_to(Path(root.__file__).resolve().parent)


def check_shortfall(cfg: RunConfig, result: Any, fb: Feedback, notes: list[str]) -> None:
    """One line when the run removed far less than asked, naming why and what to do."""
    if cfg.budget.get("target_latency") is not None:  # a time, not a count: the search warns when it falls short
        return
    which = "macs" if cfg.budget.get("target_macs") is not None else "params"
    target, protect = cfg.budget.get(f"target_{which}"), tuple(cfg.budget.get("protect") or ())
    if target is not None:
        after, before = getattr(result.cost_after, which), max(getattr(result.cost_before, which), 1)
        found = shortfall(result.groups, 1.0 - float(target), 1.0 - after / before, protect=protect)
        what = "MACs" if which == "macs" else "parameters"
    else:
        found = shortfall(result.groups, cfg.ratio, removable_fraction(result.groups, result.removed), protect=protect)
        what = "channels"
    if found is None:
        return
    scores = [np.asarray(v) for v in (result.scores or {}).values()]
    if scores and all(np.isinf(v).all() for v in scores):  # the pass chose the channels (tas's search), not a budget
        note(fb, notes, found.line(what, f"{cfg.method} chose which channels stay itself (scores of +-inf, which no "
                                          "budget overrides); its own note says why"))
        return
    note(fb, notes, found.line(what))


OVERHEAD_BOUND = 0.25


def latency_note(cfg: RunConfig, result: Any, before: dict[str, Any], after: dict[str, Any], fb: Feedback,
                  notes: list[str]) -> None:
    """With --target-latency: what the latency model predicted and what the pruned model measured, side by side."""
    target, model = cfg.budget.get("target_latency"), getattr(result, "latency", None)
    if target is None or not model:
        return
    measured = after["latency_ms"] / max(before["latency_ms"], 1e-9)
    note(fb, notes, f"--target-latency {target:g}: the latency model (measured op by op here) predicted "
                     f"{model['predicted_kept']:.2f} of {model['measured_ms']:.1f} ms; measured once each: "
                     f"{measured:.2f} ({before['latency_ms']:.1f} -> {after['latency_ms']:.1f} ms). Timings vary from "
                     f"run to run: `fxprune bench {cfg.out}` times both in turns, with a spread")
    macs_kept = after["macs"] / max(before["macs"], 1)
    if macs_kept < target * OVERHEAD_BOUND:
        note(fb, notes, f"--target-latency {target:g} kept only {macs_kept:.1%} of the MACs: most of this "
                         "model's time "
                         "on these inputs is per-op overhead, which removing channels hardly reduces, so the search "
                         "removed nearly everything it could. Check the accuracy before using it; a larger batch in "
                         "example_inputs() or --target-macs is the better budget for such a model")


def _fell(before: dict[str, Any] | None, after: dict[str, Any] | None,
          points: float) -> tuple[str, float, float] | None:
    """evaluate()'s first metric (name, before, after) when it fell by more than ``points`` (a metric in [0, 1]),
    or by more than that fraction of ``|before|`` (another); None otherwise or without both. The first metric is
    higher-is-better, as recovery's best epoch reads it (a loss goes in negated, e.g. the character LM's
    ``neg_bpc``): a rise is never reported."""
    if not before or not after:
        return None
    name = next(iter(before))
    b, a = before.get(name), after.get(name)
    if b is None or a is None:
        return None
    fell = (b - a) > (points if 0.0 <= b <= 1.0 else points * max(abs(b), 1e-12))
    return (name, b, a) if fell else None


def check_drop(before: dict[str, Any] | None, pruned: dict[str, Any] | None, fb: Feedback,
               notes: list[str], why: str | None = None) -> None:
    """Without recovery: one line when evaluate() fell by more than a few points, and how to recover
    (``why``: the reason no recovery ran, when it is not a missing train_loader())."""
    if (fell := _fell(before, pruned, DROP_POINTS - 1e-12)) is not None:  # "by 3 points or more"
        name, b, a = fell
        how = why or ("define train_loader() in the model file (recovery then runs by default) or give --epochs N")
        note(fb, notes, f"{name} changed from {b:.4g} to {a:.4g} by pruning and nothing recovered it: {how}")


def check_final(cfg: RunConfig, before: dict[str, Any] | None, after: dict[str, Any] | None, epochs: int,
                the_pass: Any, fb: Feedback, notes: list[str]) -> None:
    """After recovery: one line when evaluate()'s first metric ended more than ``FINAL_POINTS`` below the original
    model's (a metric in [0, 1]; relatively, for another), naming what would help."""
    if (fell := _fell(before, after, FINAL_POINTS)) is None:
        return
    name, b, a = fell
    helps = [f"more recovery (--epochs {2 * (cfg.finetune_epochs or epochs)})",
             "a smaller --ratio" if not any(cfg.budget.get(k) for k in ("target_macs", "target_params",
                                                                          "target_latency")) else "a larger target"]
    own = the_pass.own_recovery()
    if own and own != cfg.recover:
        helps.append(f"the pass's own recovery (--recover {own})")
    if not cfg.distill:
        helps.append("distillation from the original (--distill)")
    note(fb, notes, f"{name} ended at {a:.4g} after {epochs} epoch{'s' * (epochs > 1)} of {cfg.recover}, more than "
                    f"{FINAL_POINTS * 100:g} points from the original's {b:.4g}: try {', '.join(helps)}")


@contextlib.contextmanager
def stderr_only_on_success() -> Iterator[None]:
    """Hold back what this thread writes to ``sys.stderr``; show it only if the block succeeds.

    On failure torch.export prints its partial graph to stderr; the TraceError we raise already names
    the failing line, and a page of graph above it buries the message. ``sys.stderr`` is one object for
    the whole process, so it is replaced by one that holds back this thread's writes only: other
    threads keep writing through to the real stream.
    """
    held = ThreadHeldStream(sys.stderr, threading.get_ident())
    sys.stderr = held
    try:
        yield
    finally:
        held.owner = None  # from now on it writes everything through, should anything still hold it
        if sys.stderr is held:
            sys.stderr = held.stream
    held.stream.write(held.buffer.getvalue())
