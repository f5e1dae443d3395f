"""The release smoke: run by ``.ci/release`` with the python of a FRESH virtual environment into which the
wheel built from a clean checkout was installed (not editable), from a working folder outside the source.

What a new user does first, each step asserted: list the passes; prune the bundled example and load the
result with ``fxprune.load``; prune a tiny sharded Hugging Face folder (saved here) from disk and load it
with ``from_pretrained``; make two mistakes (a missing file; a model that cannot be traced, in a project
folder named ``fxprune`` like a fresh clone) and get exit code 2, the message and no traceback.

    python smoke.py SOURCE_CHECKOUT
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

SRC = Path(sys.argv[1]).resolve()
CLI = str(Path(sys.executable).with_name("fxprune"))
PASSES = {"l1", "slimming", "thinet", "lasso", "scratch", "flop", "anp", "tas", "sanp"}

UNTRACEABLE = '''import torch


class Bad(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no front end can trace it
            return x
        return -x


def model():
    return Bad()


def example_inputs():
    return (torch.randn(2, 3),)
'''


def fxprune(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([CLI, *args], capture_output=True, text=True)
    if done.returncode != expect:
        sys.exit(f"smoke: `fxprune {' '.join(args)}` exited {done.returncode}, expected {expect}\n"
                 f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"smoke: {what}")
    print(f"smoke: ok: {what}")


def installed_not_editable() -> None:
    import fxprune as package

    where = Path(package.__file__).resolve()
    check(SRC not in where.parents, f"fxprune imports from the installed wheel ({where}), not the checkout")


def passes_listed() -> None:
    listed = {p["name"] for p in json.loads(fxprune("passes", "--json").stdout)}
    check(PASSES <= listed, f"`fxprune passes` lists every built-in pass ({sorted(PASSES - listed)} missing)")
    for ep in entry_points(group="fxprune.passes"):
        ep.load()
    check(True, "every fxprune.passes entry point imports")


def digits_pruned_and_loaded() -> None:
    import torch

    import fxprune as package

    shutil.copy(SRC / "examples" / "digits.py", "digits.py")
    fxprune("run", "digits.py", "--pass", "l1", "--ratio", "0.5", "--no-recover", "--out", "digits-out", "--quiet")
    model = package.load("digits-out")
    check(model(torch.randn(3, 1, 8, 8)).shape == (3, 10), "the digits folder loads with fxprune.load and runs")


def tiny_llama(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")


def folder_pruned_and_loaded() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tiny_llama(Path("llama"))
    shards = sorted(Path("llama").glob("*.safetensors"))
    check(len(shards) > 1, f"the tiny Hugging Face folder is sharded ({len(shards)} shards)")
    fxprune("run", "llama", "--pass", "l1", "--ratio", "0.5", "--out", "llama-out", "--quiet")
    pruned = AutoModelForCausalLM.from_pretrained("llama-out")
    check(pruned.config.intermediate_size < 128, "the pruned folder loads with from_pretrained, narrower")
    check(pruned(torch.randint(0, 128, (2, 5))).logits.shape == (2, 5, 128), "the pruned language model runs")


def bad_input(args: list[str], message: str) -> None:
    done = fxprune(*args, expect=2)
    check(message in done.stderr and "Traceback" not in done.stderr,
          f"`fxprune {' '.join(args)}` exits 2 with {message!r} and no traceback")


def mistakes() -> None:
    bad_input(["run", "missing.py", "--pass", "l1", "--ratio", "0.5"], "missing.py")
    project = Path("fxprune")  # a user's project folder named like a fresh clone of this repository
    project.mkdir()
    (project / "bad.py").write_text(UNTRACEABLE)
    bad_input(["run", str(project / "bad.py"), "--pass", "l1", "--ratio", "0.5"], "bad.py:6:")
    check(not Path("runs").exists(), "the failed runs left no output folder")


def main() -> None:
    os.chdir(os.environ.get("SMOKE_DIR", "."))
    installed_not_editable()
    passes_listed()
    digits_pruned_and_loaded()
    folder_pruned_and_loaded()
    mistakes()
    print("smoke: passed")


if __name__ == "__main__":
    main()
