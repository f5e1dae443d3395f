"""The pruned checkpoint, streamed: each output shard is filled with the kept slices of its tensors, read
from the input shards chunk by chunk (``Checkpoint.read_kept``), written, and let go before the next, so
the memory a run needs is about one shard, not the model. Shards are named and indexed as
``save_pretrained`` names them; the rewritten config and the folder's other files go beside them.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .folder import CONFIG, INDEX, SINGLE, Checkpoint

__all__ = ["write_checkpoint", "shard_layout"]


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
                     shard_bytes: int, progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write every tensor of ``ckpt``, sliced by ``entries`` (checkpoint name -> kept indices per dim; absent:
    unchanged), into ``folder`` in shards of about ``shard_bytes``; then config.json and the side files.
    Returns the weight map (tensor -> shard file)."""
    from safetensors.torch import save_file

    sizes = {}
    for name, info in ckpt.tensors.items():
        entry = entries.get(name) or {}
        shape = [len(entry[d]) if d in entry else s for d, s in enumerate(info.shape)]
        sizes[name] = _numel(shape) * info.dtype.itemsize
    layout = shard_layout(sizes, shard_bytes)
    files = [SINGLE] if len(layout) == 1 else \
        [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
    weight_map: dict[str, str] = {}
    for i, (file, names) in enumerate(zip(files, layout)):
        tensors = {name: ckpt.read_kept(name, entries.get(name)) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
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


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
