"""The per-epoch training log (JSON lines) and the training-curve PNG drawn from it.

One line per finished epoch: ``{"epoch": 1, "loss": 0.41, "lr": 0.01, "seconds": 2.3,
"metrics": {"accuracy": 0.93}}`` (``metrics`` only when an ``evaluate`` function was given).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["write_log", "append_log", "read_log", "plot_log"]


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, allow_nan=True) + "\n"


def write_log(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """(Re)write the whole log: used at the start of a run and when resuming (drops epochs that
    finished after the checkpoint that is resumed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_line(r) for r in records))


def append_log(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(_line(record))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_log(log: str | Path | list[dict[str, Any]], png: str | Path, title: str = "training") -> Path:
    """Training curves: loss (and the learning rate, dashed, on a second axis) on the left; each
    evaluation metric on the right when the log has any."""
    import matplotlib

    matplotlib.use("Agg")  # never needs a display; safe to call from any process
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_log(log) if isinstance(log, (str, Path)) else list(log)
    epochs = [r["epoch"] for r in records]
    names = list(dict.fromkeys(k for r in records for k in (r.get("metrics") or {})))
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(10 if names else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["loss"] for r in records], marker="o", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_title(title)
    lr = ax.twinx()
    lr.plot(epochs, [r["lr"] for r in records], linestyle="--", color="tab:gray")
    lr.set_ylabel("learning rate", color="tab:gray")
    if names:
        ax = axes[0][1]
        for name in names:
            values = [(r.get("metrics") or {}).get(name, math.nan) for r in records]
            ax.plot(epochs, values, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("evaluation")
        ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
