"""The paper recipes (docs/recipes.md, examples/recipes/): every command on the page runs as written, on a random
stand-in of its data's shapes (RECIPE_SYNTHETIC=1: nothing is downloaded), the same layers thinner (a width
divisor of 8; the LM 2 blocks of 128), every epoch count cut to one and the baseline untrained; its report
records the pass, the preset's options and the budget the page asks for."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fxprune.cli import app
from fxprune.passes.registry import load_pass

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "recipes.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if "fxprune run" in line]


def shortened(argv: list[str]) -> list[str]:
    """The command with its recovery and the pass's own epochs cut to one (and sanp's latency samples to 2)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--epochs":
            out += ["--epochs", "1"]
            i += 2
            continue
        if argv[i] == "--opt" and argv[i + 1].startswith("epochs="):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    fields = set(getattr(load_pass(argv[argv.index("--pass") + 1]), "__dataclass_fields__", {}))
    if "epochs" in fields:
        out += ["--opt", "epochs=1"]
    if "latency_samples" in fields:  # sanp's report times batch-1 inputs: a measurement, not the recipe
        out += ["--opt", "latency_samples=2"]
    return out


def test_the_page_has_a_recipe_for_every_pass() -> None:
    passes = {shlex.split(c)[shlex.split(c).index("--pass") + 1] for c in commands()}
    assert passes == {"l1", "slimming", "thinet", "lasso", "scratch", "anp", "tas", "sanp", "flop"}


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.split("--pass ")[1].split()[0])
def test_recipe_runs_as_written_on_a_synthetic_stand_in(command: str, tmp_path, monkeypatch) -> None:
    words = shlex.split(command)
    env = {k: v for k, v in (w.split("=", 1) for w in words if "=" in w and not w.startswith("-")
                            and words.index(w) < words.index("fxprune"))}
    argv = words[words.index("fxprune") + 1:]
    for key, value in {**env, "RECIPE_SYNTHETIC": "1", "RECIPE_SYNTHETIC_SIZE": "16", "RECIPE_EPOCHS": "0",
                       "RECIPE_STEPS": "0", "RECIPE_WIDTH_DIV": "8", "RECIPE_WIDTH": "128",
                       "RECIPE_LAYERS": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RECIPE_CHECKPOINT", raising=False)
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in shortened(argv)]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*argv, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    name = argv[argv.index("--pass") + 1]
    assert report["pass"] == name
    preset = dict(load_pass(name).presets.get("paper", {}))
    if "preset=paper" in argv:
        assert report["options"]["preset"] == "paper"
        assert all(report["options"][k] == v for k, v in preset.items() if k != "epochs")
    for flag in ("--target-macs", "--target-params"):
        if flag in argv:
            which = flag.split("-")[-1]
            kept = report["after"][which] / report["before"][which]
            assert kept <= float(argv[argv.index(flag) + 1]) + 0.05, kept
