"""A Hugging Face model folder on disk, read tensor by tensor and slice by slice, never whole.

    config.json                         the architecture
    model.safetensors                   the weights, or shards listed by model.safetensors.index.json
    tokenizer*, generation_config.json  copied unchanged into the pruned folder

Headers are read with ``safetensors.safe_open`` (names, shapes, dtypes); a tensor is read only when a pass
or the writer asks for it. Every read opens its shard and closes it again: safetensors maps the file, and
the pages a read touched count as resident memory until the mapping goes, so holding shards open would
grow the footprint toward the checkpoint's size.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "DTYPES", "is_checkpoint_folder", "CONFIG", "INDEX",
           "SINGLE"]

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
CHUNK_BYTES = 8 << 20  # bytes of rows read per step when slicing a tensor: small next to a shard


class CheckpointError(ValueError):
    """A folder that is not a Hugging Face checkpoint fxprune can read (named, with what to do)."""


def is_checkpoint_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str                 # shard file name, in the folder
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# safetensors' dtype names (its header format) -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


class Checkpoint:
    """The config and the tensor table of a model folder; tensors are read on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root} is not a folder")
        if not (self.root / CONFIG).is_file():
            raise CheckpointError(f"{self.root} has no {CONFIG}: a Hugging Face model folder has config.json beside "
                                  "its *.safetensors (save one with model.save_pretrained(folder))")
        self.config: dict = _read_json(self.root / CONFIG)
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            self.tensors.update(self._header(f))

    def _weight_files(self) -> list[str]:
        if (self.root / INDEX).is_file():
            weight_map = _read_json(self.root / INDEX).get("weight_map", {})
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (self.root / f).is_file()]
            if missing:
                raise CheckpointError(f"{self.root / INDEX} lists {missing[0]}, which is not in the folder "
                                      f"({len(missing)} shard(s) missing): is the download complete?")
            return files
        if (self.root / SINGLE).is_file():
            return [SINGLE]
        pickled = [p for p in PICKLED if (self.root / p).is_file()]
        if pickled:
            raise CheckpointError(f"{self.root} holds its weights as {pickled[0]} (pickle), which fxprune does not "
                                  "read: convert it to safetensors first (load it with from_pretrained and "
                                  "save_pretrained(folder), which writes *.safetensors)")
        raise CheckpointError(f"{self.root} has {CONFIG} but no {SINGLE} or {INDEX}: no weights to prune")

    def _header(self, file: str) -> dict[str, TensorInfo]:
        from safetensors import SafetensorError, safe_open

        out = {}
        try:
            opened = safe_open(str(self.root / file), framework="pt")
        except SafetensorError as exc:
            raise CheckpointError(f"{self.root / file} is not a readable safetensors file ({exc}): is the download "
                                  "complete?") from None
        with opened as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {sl.get_dtype()}, which fxprune does "
                                          "not know how to slice")
                out[name] = TensorInfo(name, file, tuple(sl.get_shape()), dtype)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shard_bytes(self) -> int:
        """The largest shard's tensor bytes (the writer's default shard size)."""
        per: dict[str, int] = {}
        for t in self.tensors.values():
            per[t.file] = per.get(t.file, 0) + t.nbytes
        return max(per.values(), default=0)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, whole."""
        return self.read_kept(name, None)

    def read_kept(self, name: str, entry: dict[int, list[int]] | None, dtype: torch.dtype | None = None) \
            -> torch.Tensor:
        """The kept part of one tensor (``entry``: kept indices per dim, as in a plan; None: all of it), read
        ``CHUNK_BYTES`` of rows at a time into the preallocated result (in ``dtype``, converted chunk by chunk;
        default: the tensor's own). The shard is opened for each chunk, so that no more of its mapping than one
        chunk is resident next to the result."""
        from safetensors import safe_open

        info = self.tensors[name]
        kept = {int(d): torch.as_tensor(np.asarray(k, dtype=np.int64)) for d, k in (entry or {}).items()}
        if not info.shape:  # a scalar: nothing to slice
            with safe_open(str(self.root / info.file), framework="pt") as f:
                return f.get_tensor(name).to(dtype or info.dtype)
        out = torch.empty([len(kept[d]) if d in kept else s for d, s in enumerate(info.shape)],
                          dtype=dtype or info.dtype)
        if out.numel() == 0:
            return out
        rows = max(1, CHUNK_BYTES // max(1, info.nbytes // info.shape[0]))
        at = 0
        for start in range(0, info.shape[0], rows):
            stop = min(start + rows, info.shape[0])
            local = None
            if 0 in kept:
                k0 = kept[0]
                local = k0[(k0 >= start) & (k0 < stop)] - start
                if not len(local):
                    continue
            with safe_open(str(self.root / info.file), framework="pt") as f:
                part = f.get_slice(name)[start:stop]
            if local is not None:
                part = part.index_select(0, local)
            for d, k in sorted(kept.items()):
                if d:
                    part = part.index_select(d, k)
            out[at:at + part.shape[0]] = part
            at += part.shape[0]
            del part
        return out

    def side_files(self) -> Iterator[Path]:
        """Files copied unchanged: tokenizer, generation config, README... (not weights, index or config)."""
        skip = {CONFIG, INDEX, *PICKLED, *self.files}
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.name not in skip and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth",
                                                                            ".ckpt", ".h5", ".msgpack")):
                yield p
