"""A checkpoint's architecture without its weights: the model class from ``config.json``, built on the meta
device (no memory for weights), example inputs taken from the config, and the map between the model's
tensor names and the checkpoint's.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.state import named_tensors

from .folder import Checkpoint, CheckpointError

__all__ = ["require_transformers", "load_config", "model_class", "meta_model", "example_inputs", "checkpoint_names",
           "checkpoint_tensors", "TOKENS"]

TOKENS = 8  # token ids the trace runs on: shapes only, so a short sequence is enough


def require_transformers() -> Any:
    """The transformers package, or a CheckpointError naming the extra that installs it (a folder is read
    through transformers' config and model classes)."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError('a Hugging Face model folder is read with transformers, which is not installed: '
                              'pip install "fxprune[hf]"') from None
    return transformers


def load_config(root: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The folder's config as transformers' config class (from the folder, no network)."""
    transformers = require_transformers()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' own message says which key or model_type
        raise CheckpointError(f"{root / 'config.json'}: transformers cannot read it ({str(exc).splitlines()[0]})") \
            from None
    for k, v in (overrides or {}).items():
        setattr(config, k, v)
    return config


def model_class(config: Any) -> type[nn.Module]:
    """``config.architectures[0]`` as a transformers class; without one, the causal-LM (else the base) auto
    class of its model type. Custom code (``auto_map``) is refused: it would run code from the folder."""
    transformers = require_transformers()

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if names or getattr(config, "auto_map", None):
        raise CheckpointError(f"config.json names the architecture {names[0] if names else config.auto_map}, which "
                              "this transformers does not define (custom modelling code is not run): write a "
                              "model file whose model() builds it (see the README)")
    from transformers.models.auto import modeling_auto as auto

    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_MAPPING_NAMES):
        if config.model_type in mapping:
            return getattr(transformers, mapping[config.model_type])
    raise CheckpointError(f"config.json's model_type {config.model_type!r} has no transformers model class")


def meta_model(config: Any, cls: type[nn.Module]) -> nn.Module:
    """The architecture with every tensor on the meta device, in eval mode; no cache (a static trace)."""
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        model = cls(config)
    return model.eval()


def example_inputs(model: nn.Module, config: Any, tokens: int = TOKENS) -> dict[str, torch.Tensor]:
    """What the trace runs on, from the config: ``TOKENS`` token ids (plus as many decoder ids for an
    encoder-decoder), or one image of ``image_size`` for a vision model; on the meta device."""
    main = getattr(model, "main_input_name", "input_ids")
    meta = torch.device("meta")
    if main == "input_ids":
        ids = torch.zeros(1, tokens, dtype=torch.long, device=meta)
        out = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids
        return out
    if main == "pixel_values":
        size = getattr(config, "image_size", None)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        if size[0] is None:
            raise CheckpointError("config.json has no image_size to build an example image from: write a model "
                                  "file with example_inputs()")
        return {"pixel_values": torch.zeros(1, channels, *size, device=meta)}
    raise CheckpointError(f"{type(model).__name__} reads {main!r}, which fxprune cannot build from config.json: "
                          "write a model file with model() and example_inputs() (see the README)")


def checkpoint_names(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model tensor name -> the checkpoint's name for it, as ``from_pretrained`` reads it: transformers' key
    renamings for the model class (checkpoints keep their original names: ``encoder.layer.0.attention.query``
    for ``layers.0.attention.q_proj``), the ``base_model_prefix`` added or dropped, and tied twins sharing one
    tensor on disk. A model tensor that a converter assembles from several checkpoint tensors (fused experts)
    has no single name, and is left out with the non-persistent buffers: the groups touching it stay whole."""
    state = named_tensors(model)
    rename = _renamer(model, state)
    out: dict[str, str] = {}
    for key in ckpt.tensors:
        name = rename(key)
        if name is not None and name in state:
            out.setdefault(name, key)
    by_id: dict[int, list[str]] = {}
    for name, t in state.items():
        by_id.setdefault(id(t), []).append(name)
    for names in by_id.values():  # tied weights: one copy on disk serves every name
        hit = next((out[n] for n in names if n in out), None)
        if hit is not None:
            for n in names:
                out.setdefault(n, hit)
    return out


def checkpoint_tensors(ckpt: Checkpoint) -> Callable[[nn.Module], tuple[dict[str, str], dict[str, tuple[int, ...]]]]:
    """What ``analyse_architecture`` asks of a folder: for a model, its tensor names in the checkpoint
    (``checkpoint_names``) and the checkpoint's shapes."""
    return lambda model: (checkpoint_names(model, ckpt), {n: t.shape for n, t in ckpt.tensors.items()})


def _renamer(model: nn.Module, state: dict[str, torch.Tensor]) -> Callable[[str], str | None]:
    """Checkpoint key -> model name (None: a converter merges it with others). transformers 5's loading
    rules where it has them; else the same name with the base-model prefix added or dropped."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoints carry the model's own names
        def plain(key: str) -> str | None:
            for cand in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}"):
                if cand in state:
                    return cand
            return key
        return plain
    rules = get_model_conversion_mapping(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]

    def renamed(key: str) -> str | None:
        name, converter = rename_source_key(key, renamings, converters, prefix or None, state)
        return None if converter is not None else name
    return renamed
