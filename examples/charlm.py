"""fxprune's language-model example: a small character-level transformer on Python's own standard library.

The corpus is the source of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), so it is real text on every machine and nothing is downloaded.
``model()`` trains the network for about a minute on two free CPU cores (100 steps of about 0.6 s),
so fxprune starts from a trained model; attention heads and MLP channels are what it prunes:

    fxprune run examples/charlm.py --pass l1 --ratio 0.5 --finetune-epochs 1
    fxprune run examples/charlm.py --pass flop --target-params 0.5     # factorised L0 pruning

CHARLM_STEPS (pre-training steps), CHARLM_BATCHES (batches per training epoch) and CHARLM_VAL_BATCHES
(validation batches) shrink it for quick checks.

The corpus, exactly: every ``.py`` file under the stdlib folder, found by walking it and sorted by
its path relative to that folder (POSIX separators, plain string order), skipping any file inside a
folder named ``test``, ``tests``, ``idlelib`` or ``site-packages`` (at any depth) and any file under
1 KiB (1024 bytes); files are taken in that order, whole, until the total reaches 2 MiB
(2,097,152 bytes; the last file taken crosses that mark), and concatenated as raw bytes (the stdlib's
sources are UTF-8, so these are ``text.encode("utf-8")`` bytes). The vocabulary is the 256 byte
values, so nothing is out of vocabulary. The first 90% of the bytes train, the last 10% validate.
The corpus is fixed for a given Python version (it is this interpreter's stdlib: 3.11 and 3.12 give
different, equally deterministic, corpora).

Metrics: ``evaluate()`` returns ``{"neg_bpc": -bpc, "bpc": bpc}``, bits per character (byte) on the
validation windows, where LOWER bpc is better (uniform over 256 bytes is 8). ``neg_bpc`` comes first
because fxprune reads the first metric as higher-is-better when it picks the best checkpoint.

This file follows the model-file convention (see the README): model(), example_inputs(), and the
optional train_loader(), val_loader(), loss() and evaluate(). It is plain PyTorch: fxprune is not
imported here.
"""
from __future__ import annotations

import functools
import math
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

SEED = 0
VOCAB = 256                  # byte values
SEQ = 128                    # window length (and the positional embedding's maximum length)
BATCH = 32
TRAIN_BATCHES = int(os.environ.get("CHARLM_BATCHES", "50"))   # batches per train_loader() epoch
VAL_BATCHES = int(os.environ.get("CHARLM_VAL_BATCHES", "16"))  # batches in val_loader()
MIN_FILE_BYTES = 1024        # files smaller than 1 KiB are skipped
CORPUS_BYTES = 2 * 2 ** 20   # files are taken until the total reaches 2 MiB
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
TRAIN_FRACTION = 0.9
# Optimiser steps (batches of 32 x 128 bytes) model() trains for: about a minute on two CPU cores,
# for about 3.6 bits per byte (uniform is 8, unigram about 5); CHARLM_STEPS overrides it.
PRETRAIN_STEPS = int(os.environ.get("CHARLM_STEPS", "100"))


def corpus_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The corpus's files, in order (see the module docstring for the rule)."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    candidates = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # not even walked: site-packages can be large
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                candidates.append((path.relative_to(root).as_posix(), path))
    chosen, total = [], 0
    for _, path in sorted(candidates):
        if total >= CORPUS_BYTES:
            break
        size = path.stat().st_size
        if size < MIN_FILE_BYTES:
            continue
        chosen.append(path)
        total += size
    return chosen


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the corpus's bytes as int64 tensors, the first 90% and the last 10%."""
    raw = b"".join(path.read_bytes() for path in corpus_files())
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(len(data) * TRAIN_FRACTION)
    return data[:cut], data[cut:]


class Windows(Dataset):
    """Windows of ``data`` at fixed starts: item i is (data[s:s+SEQ], data[s+1:s+SEQ+1]), s = starts[i]."""

    def __init__(self, data: torch.Tensor, starts: torch.Tensor) -> None:
        self.data, self.starts = data, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.data[s:s + SEQ + 1]
        return chunk[:-1], chunk[1:]


def _train_starts(count: int, seed: int) -> torch.Tensor:
    train, _ = _data()
    return torch.randint(0, len(train) - SEQ, (count,), generator=torch.Generator().manual_seed(seed))


def _val_starts() -> torch.Tensor:
    """VAL_BATCHES * BATCH windows spread evenly over the validation bytes (no randomness)."""
    _, val = _data()
    count = VAL_BATCHES * BATCH
    stride = (len(val) - SEQ - 1) // (count - 1)
    return torch.arange(count) * stride


def train_loader() -> DataLoader:
    """TRAIN_BATCHES batches of BATCH random windows: fixed windows, seeded shuffle (the same on every run)."""
    train, _ = _data()
    generator = torch.Generator().manual_seed(SEED)
    return DataLoader(Windows(train, _train_starts(TRAIN_BATCHES * BATCH, SEED)), batch_size=BATCH,
                      shuffle=True, generator=generator)


def val_loader() -> DataLoader:
    _, val = _data()
    return DataLoader(Windows(val, _val_starts()), batch_size=BATCH, shuffle=False)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int, d_mlp: int) -> None:
        super().__init__()
        self.head_dim = d_model // heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        # (B, T, heads, head_dim) -> (B, heads, T, head_dim); -1 heads, so fewer heads need no edit
        q = self.q(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    """Byte embedding + learned positions -> 2 pre-LN blocks (4 heads, MLP 512) -> LayerNorm -> head."""

    def __init__(self, d_model: int = 128, heads: int = 4, d_mlp: int = 512, layers: int = 2,
                 max_len: int = SEQ, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)  # not tied to the embedding
        # Small logits at the start: the untrained model predicts about uniform bytes (8 bits each).
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, T) int64 bytes, T <= max_len -> logits (B, T, vocab) for the next byte."""
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next byte, averaged over every position of every window."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def evaluate(model: nn.Module, loader: Iterable[Any] | None = None) -> dict[str, float]:
    """``{"neg_bpc": -bpc, "bpc": bpc}`` on ``loader`` (default: val_loader()), in bits per byte (lower bpc is
    better).

    ``neg_bpc`` is first because fxprune reads the first metric as higher-is-better. The model stays
    on its device (batches go to it) and keeps its train/eval mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats = 0.0
    count = 0
    with torch.no_grad():
        for x, y in (val_loader() if loader is None else loader):
            out = model(x.to(device))
            nats += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.to(device).reshape(-1),
                                          reduction="sum"))
            count += y.numel()
    model.train(was_training)
    bpc = nats / max(count, 1) / math.log(2)
    return {"neg_bpc": -bpc, "bpc": bpc}


def example_inputs() -> tuple[torch.Tensor]:
    # A batch of 2 (not 1): torch.export specialises a batch size of 1, and the pruned model should
    # accept any batch size.
    _, val = _data()
    return (torch.stack([Windows(val, _val_starts())[i][0] for i in range(2)]),)


def pretrain(net: nn.Module, steps: int, seed: int = SEED) -> nn.Module:
    """Train ``net`` in place for ``steps`` AdamW steps (lr 3e-3, weight decay 0.01, constant) on
    batches of BATCH windows drawn at random from the whole training split (seeded, so deterministic;
    not train_loader()'s fixed 1600 windows, which would repeat after 50 steps). Returns it in train mode."""
    train, _ = _data()
    starts = _train_starts(steps * BATCH, seed + 1).view(max(steps, 0), BATCH)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    net.train()
    for row in starts:
        chunks = torch.stack([train[int(s):int(s) + SEQ + 1] for s in row])
        x, y = chunks[:, :-1], chunks[:, 1:]
        optimizer.zero_grad()
        loss(net(x), y).backward()
        optimizer.step()
    return net


def model() -> nn.Module:
    """A CharLM trained for PRETRAIN_STEPS steps (deterministic), in eval mode."""
    torch.manual_seed(SEED)
    net = CharLM()
    return pretrain(net, PRETRAIN_STEPS).eval()


if __name__ == "__main__":  # `python examples/charlm.py`: train and print the bits per character of the unpruned model
    print(evaluate(model()))
