"""The flop recipe: a byte-level language model on enwik8 (the first 10^8 bytes of English Wikipedia), the FLOP
paper's character-level task, split as the authors' script splits it (the last 2 x 5M bytes validate and test).
For users with the data (or a network) and a GPU; the command and the paper's numbers are in docs/recipes.md:

    fxprune run examples/recipes/enwik8.py --pass flop --target-params 0.2 --opt preset=paper --opt epochs=20

The network is the character LM of ``examples/charlm.py`` at a larger size (``RECIPE_LAYERS`` pre-LN blocks of
width ``RECIPE_WIDTH``, 8 heads, MLP 4x), not the authors' SRU (a package of its own) or Transformer-XL: the
recipe reproduces the method's setting (data, schedule, budget), not their exact network.

- ``RECIPE_DATA``: the folder holding ``enwik8`` (or ``enwik8.zip``), downloaded from
  http://mattmahoney.net/dc/enwik8.zip when missing (default ``~/.cache/fxprune/enwik8``);
- ``RECIPE_CHECKPOINT``: a trained baseline (safetensors), loaded when it exists, else written after training;
- ``RECIPE_STEPS``: the baseline's AdamW steps (default 100,000);
- ``RECIPE_SYNTHETIC=1``: random bytes of the same form instead of the data (``RECIPE_LAYERS`` and
  ``RECIPE_WIDTH`` shrink the network too): nothing is downloaded. The test suite runs the recipe so.

Plain PyTorch: fxprune is not imported here.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import baseline  # noqa: E402

_spec = importlib.util.spec_from_file_location("fxprune_example_charlm", Path(__file__).resolve().parents[1] /
                                               "charlm.py")
charlm = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules[_spec.name] = charlm  # type: ignore[union-attr]
_spec.loader.exec_module(charlm)  # type: ignore[union-attr]

SEQ, BATCH = charlm.SEQ, 32
TEST_BYTES = 5_000_000
URL = "http://mattmahoney.net/dc/enwik8.zip"
loss = charlm.loss


def synthetic() -> bool:
    return os.environ.get("RECIPE_SYNTHETIC", "0") == "1"


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) bytes as int64 tensors: the authors' split (the last 2 x 5M bytes are valid and test)."""
    if synthetic():
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (64 * SEQ,), generator=g), torch.randint(0, 256, (8 * SEQ,), generator=g)
    folder = Path(os.environ.get("RECIPE_DATA", Path.home() / ".cache" / "fxprune" / "enwik8"))
    raw_path = folder / "enwik8"
    if not raw_path.exists():
        archive = folder / "enwik8.zip"
        if not archive.exists():
            import urllib.request

            folder.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(URL, archive)
        with zipfile.ZipFile(archive) as z:
            z.extract("enwik8", folder)
    data = torch.frombuffer(bytearray(raw_path.read_bytes()), dtype=torch.uint8).long()
    return data[: -2 * TEST_BYTES], data[-2 * TEST_BYTES: -TEST_BYTES]


def _loader(data: torch.Tensor, windows: int, shuffle: bool) -> DataLoader:
    starts = (torch.randint(0, len(data) - SEQ - 1, (windows,), generator=torch.Generator().manual_seed(0))
              if shuffle else torch.arange(windows) * ((len(data) - SEQ - 1) // max(windows - 1, 1)))
    return DataLoader(charlm.Windows(data, starts), batch_size=BATCH, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def train_loader() -> DataLoader:
    return _loader(_data()[0], 64 if synthetic() else 2000 * BATCH, True)


def val_loader() -> DataLoader:
    return _loader(_data()[1], 8 if synthetic() else 200 * BATCH, False)


def build() -> nn.Module:
    width = int(os.environ.get("RECIPE_WIDTH", "512"))
    return charlm.CharLM(d_model=width, heads=8, d_mlp=4 * width, layers=int(os.environ.get("RECIPE_LAYERS", "12")))


def model() -> nn.Module:
    torch.manual_seed(0)
    return baseline(build(), _train)


def _train(net: nn.Module) -> None:
    """``RECIPE_STEPS`` AdamW steps at 3e-4 over the training windows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).train()
    steps = int(os.environ.get("RECIPE_STEPS", "100000"))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.01)
    batches = iter(())
    for _ in range(steps):
        x, y = next(batches, (None, None))
        if x is None:
            batches = iter(train_loader())
            x, y = next(batches)
        opt.zero_grad()
        loss(net(x.to(device)), y.to(device)).backward()
        opt.step()
    net.cpu().eval()


def example_inputs() -> tuple[torch.Tensor]:
    return (next(iter(val_loader()))[0][:2],)


def evaluate(net: nn.Module) -> dict[str, float]:
    """``{"neg_bpc", "bpc"}`` on the validation windows (bits per byte, lower is better): the character LM's."""
    return charlm.evaluate(net, val_loader())
