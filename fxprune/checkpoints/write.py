"""The pruned checkpoint, streamed: every output tensor is read from the input shards chunk by chunk
(``Checkpoint.read_kept``), appended to its output shard and let go before the next, so the memory a run
needs is about one tensor, not a shard or the model. Shards are named and indexed as ``save_pretrained``
names them; the rewritten config and the folder's other files go beside them.

Why not ``safetensors.torch.save_file``: it takes a whole shard's tensors at once. The format is simple
enough to write tensor by tensor (an 8-byte header length, a JSON header with every tensor's dtype, shape
and byte range, padded to 8 bytes, then the data in that order): every shape is known from the plan before
a byte is read, so the header goes first. What is written is read back by ``safetensors.safe_open`` in the
tests and by ``from_pretrained``.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .folder import CONFIG, DTYPES, INDEX, SINGLE, Checkpoint

__all__ = ["write_checkpoint", "shard_layout", "safetensors_stream"]

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def shard_layout(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Tensors (in checkpoint order) packed into shards of at most ``shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return [s for s in shards if s]


def write_checkpoint(ckpt: Checkpoint, entries: dict[str, dict[int, list[int]]], folder: Path, config: dict,
                     shard_bytes: int, progress: Callable[[int, int], None] | None = None,
                     rename: dict[str, str] | None = None,
                     replaced: Callable[[str], torch.Tensor | None] = lambda name: None,
                     added: Mapping[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Write every tensor of ``ckpt``, sliced by ``entries`` (checkpoint name -> kept indices per dim; absent:
    unchanged), into ``folder`` in shards of about ``shard_bytes``; then config.json and the side files.
    ``rename``: checkpoint name -> its name in the output, the tensors it lacks left out (removed blocks);
    ``replaced(name)``: a new full-size tensor written instead of the checkpoint's (sliced, in its dtype), or None;
    ``added``: tensors the checkpoint lacks (new biases), written as they are after the others.
    Returns the weight map (tensor -> shard file)."""
    added = dict(added or {})
    sizes, shapes, dtypes, source = {}, {}, {}, {}
    for old, info in ckpt.tensors.items():
        if rename is not None and old not in rename:
            continue
        name = rename[old] if rename is not None else old
        entry = entries.get(old) or {}
        source[name] = old
        shapes[name] = [len(entry[d]) if d in entry else s for d, s in enumerate(info.shape)]
        dtypes[name] = info.dtype
    for name, t in added.items():
        shapes[name], dtypes[name] = list(t.shape), t.dtype
    sizes = {name: math.prod(shape) * dtypes[name].itemsize for name, shape in shapes.items()}
    layout = shard_layout(sizes, shard_bytes)
    files = [SINGLE] if len(layout) == 1 else \
        [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(zip(files, layout)):
        header = {name: (dtypes[name], shapes[name]) for name in names}
        with open(folder / file, "wb") as f:
            for name, written in zip(names, safetensors_stream(f, header)):
                written(added[name] if name in added else
                        _kept(ckpt, source[name], entries.get(source[name]), replaced))
        weight_map.update({name: file for name in names})
        if progress is not None:
            progress(i + 1, len(layout))
    if len(layout) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in ckpt.side_files():
        shutil.copy2(path, folder / path.name)
    return weight_map


def _kept(ckpt: Checkpoint, name: str, entry: dict[int, list[int]] | None,
          replaced: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    new = replaced(name)
    if new is None:
        return ckpt.read_kept(name, entry)
    from fxprune.compaction.plan import slice_tensor

    return slice_tensor(entry, new).to(ckpt.tensors[name].dtype)


def safetensors_stream(f: BinaryIO, header: dict[str, tuple[torch.dtype, list[int]]]) \
        -> Iterator[Callable[[torch.Tensor], None]]:
    """Write a safetensors header for ``header`` (name -> dtype, shape, in file order) to ``f``, then yield one
    writer per tensor, to be called in that order with the tensor itself (its dtype and shape are checked)."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    at = 0
    for name, (dtype, shape) in header.items():
        n = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)) + text)
    for name, (dtype, shape) in header.items():
        def write(t: torch.Tensor, name: str = name, dtype: torch.dtype = dtype, shape: list[int] = shape) -> None:
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise ValueError(f"{name}: header says {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        yield write
