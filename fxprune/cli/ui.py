"""Terminal feedback for the command line (rich): progress for each stage, tables for results."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fxprune.recovery import Hook, TrainState

from .report import cost_rows, format_ms, human
from .runconfig import Feedback

__all__ = ["RichFeedback", "summary_table", "groups_table", "blocks_table", "passes_table", "bench_table",
           "input_axes_line"]


class _TrainBar(Hook):
    """The fine-tuning progress bar: one tick per batch, loss in the description."""

    def __init__(self, progress: Progress, epochs: int, batches: int | None) -> None:
        self.progress, self.epochs = progress, epochs
        self.task = progress.add_task("fine-tuning", total=epochs * batches if batches else None)

    def before_epoch(self, state: TrainState) -> None:
        self.progress.update(self.task, description=f"fine-tuning: epoch {state.epoch + 1}/{self.epochs}")

    def after_step(self, state: TrainState) -> None:
        self.progress.update(self.task, advance=1,
                             description=f"fine-tuning: epoch {state.epoch + 1}/{self.epochs}, loss {state.loss:.3f}")

    def after_epoch(self, state: TrainState) -> None:
        if state.epoch + 1 == self.epochs:
            epochs = f"{self.epochs} epoch{'s' * (self.epochs > 1)}"
            self.progress.update(self.task, description=f"fine-tuned {epochs}, loss {state.log[-1]['loss']:.3f}")


class RichFeedback(Feedback):
    """Spinners for stages, a bar for training epochs; everything on ``console`` (stderr by default)."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                                 BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console or Console(stderr=True))

    def __enter__(self) -> RichFeedback:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        task = self.progress.add_task(description, total=1)
        try:
            yield
        except BaseException:
            self.progress.update(task, description=f"[red]failed: {description}")
            self.progress.stop_task(task)
            raise
        self.progress.update(task, completed=1)

    def training(self, epochs: int, batches: int | None) -> Hook:
        return _TrainBar(self.progress, epochs, batches)

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/yellow] {text}", highlight=False)


TARGET_WORDS = {"macs": "MACs", "params": "parameters", "latency": "latency"}


def _title(report: dict[str, Any]) -> str:
    """"PASS at ratio R: OUT", or "PASS to F of the MACs: OUT" for a resource target."""
    target = report.get("target") or {}
    budget = "".join(f" to {v:g} of the {TARGET_WORDS.get(k, k)}" for k, v in target.items()) \
        or f" at ratio {report['ratio']}"
    return f"{report['pass']}{budget}: {report['out']}"


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title=_title(report), title_justify="left")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in cost_rows(report):
        table.add_row(*row)
    return table


def folder_table(report: dict[str, Any]) -> Table:
    """``fxprune run HF_FOLDER``: parameters and MACs before and after, each config field that changed, and
    whether ``from_pretrained`` loads the result."""
    table = Table(title=_title(report), title_justify="left")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for what, label in (("params", "parameters"), ("macs", "MACs")):
        if what in report:
            a, b = report[what]["before"], report[what]["after"]
            table.add_row(label, f"{a:,}", f"{b:,}", f"{(b - a) / a:+.1%}" if a else "")
    if "blocks" in report:
        blocks = report["blocks"]
        table.add_row("decoder blocks", str(blocks["before"]), str(blocks["after"]),
                      "removed " + ", ".join(map(str, blocks["removed"])))
    if isinstance(report.get("experts"), dict):
        experts, width = report["experts"], report["expert_width"]
        table.add_row("experts per layer", str(experts["before"]), str(experts["after"]), "")
        if width["after"] != width["before"]:
            table.add_row("expert width", str(width["before"]), str(width["after"]), "")
    ppl = report.get("perplexity") or {}
    if ppl:
        a, b = ppl["before"]["perplexity"], (ppl["after"] or {}).get("perplexity")
        table.add_row("perplexity", f"{a:.4g}", f"{b:.4g}" if b is not None else "-",
                      f"{(b - a) / a:+.1%}" if b is not None else "")
    for key, (a, b) in report["config_changes"].items():
        table.add_row(f"config {key}", str(a), str(b), "")
    table.add_row("from_pretrained", "", "loads" if report["loadable"] else "does NOT load", "")
    return table


def groups_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("id", "size", "status", "producers", "consumers", "why / note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        size = f"{r['channels']}x{r['block']}" if r["block"] > 1 else str(r["channels"])
        note = r["why"] or ("" if r["exact"] else f"inexact: {r['inexact_reason']}")
        status = "[green]prunable" if r["status"] == "prunable" else "[yellow]frozen"
        table.add_row(str(r["group"]), size, status, ", ".join(r["producers"]) or "-",
                      ", ".join(r["consumers"]) or "-", note)
    return table


def blocks_table(rows: list[dict[str, Any]]) -> Table:
    """Removable residual blocks per stage (rows of ``fxprune inspect --json``'s "blocks"): how many, their
    names (after the stage's prefix) and their share of the model's MACs."""
    table = Table(title="removable residual blocks", title_justify="left")
    for col in ("stage", "blocks", "names", "MACs share"):
        table.add_column(col, overflow="fold", justify="right" if col in ("blocks", "MACs share") else "left")
    stages: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    for stage, blocks in stages.items():
        names = [b["name"].removeprefix(f"{stage}.") if stage else b["name"] for b in blocks]
        share = sum(b["macs_share"] for b in blocks)
        table.add_row(stage or "(top level)", str(len(blocks)), ", ".join(names), f"{share:.1%}")
    return table


def passes_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="registered passes (use with --pass NAME, options with --opt key=value)", title_justify="left")
    for col in ("pass", "description", "scope", "options"):
        table.add_column(col, overflow="fold")
    for r in rows:
        opts = ", ".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in r["options"]) or "-"
        for preset, values in (r.get("presets") or {}).items():
            opts += f"; preset={preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
        table.add_row(r["name"], r["description"], r["scope"], opts)
    return table


PROMISE_HINT_BELOW = 0.8  # of the MACs promise, in eager PyTorch, where bench suggests asking for time instead


def bench_hint(rows: list[dict[str, Any]]) -> str | None:
    """One line when an eager pruned row is far below its MACs promise and the folder was not pruned to a latency:
    this model's time follows its activations, not its MACs; ask for time."""
    low = [r for r in rows if r["model"] == "pruned" and r.get("speedup") is not None
           and r.get("latency_target") is None and r["promise_kept"] < PROMISE_HINT_BELOW]
    if not low:
        return None
    r = low[0]
    return (f"note: {r['speedup']:.2f}x faster for {r['macs_reduction']:.1f}x fewer MACs "
            f"({r['promise_kept']:.2f} of the "
            "promise): much of this model's time is in ops that follow its activations, not its MACs (batch norm, "
            "activations, depthwise convolutions). `fxprune run ... --target-latency T` prunes to a latency measured "
            "on this device instead.")


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Latency with its spread over rounds, and the speed-up next to the MACs reduction it promised."""
    table = Table(title=title, title_justify="left", caption="ms: median over rounds (lowest-highest round); "
                  "of MACs: speed-up / MACs reduction, 1.00 = as much faster as smaller; of target: speed-up / the "
                  "one --target-latency promised; a speed-up compares the "
                  "original and the pruned model in the same runtime", caption_justify="left")
    target = any(r.get("latency_target") is not None for r in rows)
    for col in ("device", "model", "ms", "memory", "MACs", "speed-up", "of MACs") + (("of target",) if target else ()):
        table.add_column(col, justify="left" if col in ("device", "model") else "right")
    for r in rows:
        pruned = r.get("speedup") is not None
        base = r.get("baseline")
        label = r["model"] + (f" vs {base}" if base and base != r["model"].replace("pruned", "original") else "")
        table.add_row(r["device"], label,
                      f"{format_ms(r['latency_ms'])} "
                      f"({format_ms(r['latency_ms_min'])}-{format_ms(r['latency_ms_max'])})",
                      "-" if r["peak_memory_bytes"] is None else human(r["peak_memory_bytes"], "B"), human(r["macs"]),
                      f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})" if pruned else "",
                      f"{r['promise_kept']:.2f} of {r['macs_reduction']:.1f}x" if pruned else "",
                      *((f"{r['latency_promise_kept']:.2f} of {1 / r['latency_target']:.1f}x"
                         if r.get("latency_target") else "",) if target else ()))
    return table


def input_axes_line(axes: dict[str, Any]) -> str:
    """``fxprune inspect``'s line on input sizes: the axes the pruned model will take at any size, and those it
    fixes though the original does not, with why."""
    free = ", ".join(f"{a['input']} axis {a['axis']}" for a in axes["dynamic"]) or "none"
    text = f"input axes kept free (checked at a second size): {free}"
    for f in axes["fixed"]:
        text += f"\nfixed at {f['size']}: {f['input']} axis {f['axis']} ({f['why']})"
    return text
