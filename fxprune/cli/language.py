"""The command line's language-model folder pieces: the text options (``--calib``, ``--eval-text``), perplexity
(``fxprune eval DIR --text FILE``), the decoder blocks' importance and the routed experts' share of the tokens
(``fxprune inspect DIR --calib FILE``), all run one decoder layer at a time from disk
(``fxprune.checkpoints.stream``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .runconfig import OptionError

__all__ = ["text_data", "perplexity_command", "perplexity_table", "block_rows", "blocks_importance_table",
           "expert_rows", "experts_table"]


def text_data(calib: Path | None, eval_text: Path | None, samples: int | None, length: int | None,
              folder: bool) -> Any:
    """The run's text options as ``fxprune.checkpoints.TextData``; given for a model file, an error: its passes
    read the model file's train_loader(), and its evaluate() measures it."""
    given = [name for name, v in (("--calib", calib), ("--eval-text", eval_text), ("--calib-samples", samples),
                                  ("--seq-length", length)) if v is not None]
    if not folder:
        if given:
            raise OptionError(f"{', '.join(given)}: for a Hugging Face model folder; a model file's passes read its "
                              "train_loader() and its evaluate() measures it")
        return None
    from fxprune.checkpoints.calibration import TextData

    for name, path in (("--calib", calib), ("--eval-text", eval_text)):
        if path is not None and not Path(path).is_file():
            raise OptionError(f"{name} {path}: no such file (give a plain-text file)")
    defaults = TextData()
    return TextData(calib, eval_text, samples or defaults.samples, length or defaults.length)


def perplexity_command(source: Path, pruned: Path | None, text: Path | None, length: int) -> list[dict[str, Any]]:
    """``fxprune eval DIR [PRUNED_DIR] --text FILE``: one row per folder."""
    from fxprune.checkpoints import is_checkpoint_folder
    from fxprune.checkpoints.perplexity import perplexity

    if text is None:
        raise OptionError("fxprune eval DIR: give --text FILE.txt, the text to measure perplexity on")
    if not Path(text).is_file():
        raise OptionError(f"--text {text}: no such file (give a plain-text file)")
    folders = [("original" if pruned is not None else source.name, source)]
    if pruned is not None:
        folders.append(("pruned", pruned))
    for _, f in folders:
        if not is_checkpoint_folder(f):
            raise OptionError(f"{f} is not a Hugging Face model folder (config.json + *.safetensors): --text measures "
                              "a language model folder")
    return [dict(perplexity(f, text, length), model=name, folder=str(f)) for name, f in folders]


def perplexity_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"perplexity on {rows[0]['text']} ({rows[0]['tokens']:,} tokens predicted, "
                        f"{rows[0]['tokenizer']})", title_justify="left")
    for col in ("model", "perplexity", "bits per byte", "peak loaded", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['perplexity']:.4g}", f"{r['bits_per_byte']:.4f}",
                      f"{r['peak_loaded_bytes'] / 2**20:.1f} MiB", f"{r['seconds']:.1f}")
    return table


def block_rows(folder: Path, calib: Path) -> list[dict[str, Any]]:
    """Per decoder block: ShortGPT's block influence on the calibration text (1 - cos(input, output))."""
    from fxprune.checkpoints import Checkpoint
    from fxprune.checkpoints.calibration import Calibration, TextData
    from fxprune.checkpoints.depth import block_importance

    cal = Calibration(Checkpoint(folder), TextData(calib=_text_file(calib)))
    bi = block_importance(cal.stream, cal.windows, "bi")
    order = {int(i): r for r, i in enumerate(sorted(range(len(bi)), key=bi.__getitem__))}
    return [{"block": i, "block_influence": v, "rank": order[i]} for i, v in enumerate(bi)]


def blocks_importance_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="decoder blocks on the calibration text: block influence, 1 - cos(input, output) (ShortGPT); "
                        "the lowest go first with --pass depth", title_justify="left")
    for col in ("block", "block influence", "removal order"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["block"]), f"{r['block_influence']:.4f}", str(r["rank"] + 1))
    return table


def expert_rows(folder: Path, calib: Path) -> list[dict[str, Any]]:
    """Per decoder layer with routed experts: how many calibration tokens the router sends to each expert (its
    top-k picks), and their share; empty for a model without experts."""
    from fxprune.checkpoints import Checkpoint
    from fxprune.checkpoints.calibration import Calibration, TextData
    from fxprune.checkpoints.experts import expert_stats, moe_layers

    cal = Calibration(Checkpoint(folder), TextData(calib=_text_file(calib)))
    layers = moe_layers(cal.stream)
    if not layers:
        return []
    stats = expert_stats(cal.stream, cal, layers)
    return [{"layer": i, "picks": s.picks.astype(int).tolist(), "share": (s.picks / max(s.picks.sum(), 1)).tolist()}
            for i, s in stats.items()]


def experts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="routed experts on the calibration text: each one's share of the router's picks, per layer "
                        "(fxprune run DIR --pass experts removes the least picked first)", title_justify="left")
    table.add_column("layer", justify="right")
    for e in range(len(rows[0]["share"])):
        table.add_column(f"e{e}", justify="right")
    for r in rows:
        least = min(r["share"])
        table.add_row(str(r["layer"]), *[f"[yellow]{v:.1%}" if v == least else f"{v:.1%}" for v in r["share"]])
    return table


def _text_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise OptionError(f"--calib {path}: no such file (give a plain-text file)")
    return path
