"""A checkpoint's architecture without its weights: the model class from ``config.json``, built on the meta
device (no memory for weights), example inputs taken from the config, and the map between the model's
tensor names and the checkpoint's.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.state import named_tensors

from .folder import Checkpoint, CheckpointError

__all__ = ["require_transformers", "load_config", "model_class", "meta_model", "example_inputs", "checkpoint_names",
           "checkpoint_tensors", "fused_sources", "Fused", "written_mismatches", "TOKENS"]

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


def checkpoint_names(model: nn.Module, ckpt: Checkpoint | Mapping[str, Any]) -> dict[str, str]:
    """Model tensor name -> the checkpoint's name for it, as ``from_pretrained`` reads it: transformers' key
    renamings for the model class (checkpoints keep their original names: ``encoder.layer.0.attention.query``
    for ``layers.0.attention.q_proj``), the ``base_model_prefix`` added or dropped, and tied twins sharing one
    tensor on disk. A model tensor that a converter assembles from several checkpoint tensors (fused experts)
    has no single name (``fused_sources`` says which), and is left out with the non-persistent buffers: the
    channel groups touching it stay whole. ``ckpt``: the folder, or its tensor names."""
    state = named_tensors(model)
    rename = _renamer(model, state)
    out: dict[str, str] = {}
    for key in _keys(ckpt):
        name, converter = rename(key)
        if converter is None and name in state:
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


@dataclass(frozen=True)
class Fused:
    """A model tensor that transformers assembles at load from one checkpoint tensor per expert (and per source:
    gate and up projections): ``keys[s][e]``, the checkpoint name of source ``s`` of expert ``e``. Stacked over
    the experts (dim 0), the sources then concatenated along dim 1: transformers' ``MergeModulelist(dim=0)``
    and ``Concatenate(dim=1)``, the two operations every mixture-of-experts family's converter uses."""

    keys: tuple[tuple[str, ...], ...]
    patterns: tuple[str, ...]   # per source, transformers' pattern (``.experts.*.w1.weight``): ``*`` the expert

    def renumbered(self, key: str, source: int, expert: int) -> str:
        """``key`` (source ``source``'s tensor of some expert) as the tensor of expert number ``expert``."""
        m = re.search(_expert_pattern(self.patterns[source]), key)
        assert m is not None
        return key[:m.start(1)] + str(expert) + key[m.end(1):]

    @property
    def experts(self) -> int:
        return len(self.keys[0])

    def assemble(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        parts = [torch.stack([read(k) for k in per]) for per in self.keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


_FUSING = (("MergeModulelist", 0),), (("MergeModulelist", 0), ("Concatenate", 1))  # the operations understood


def fused_sources(model: nn.Module, ckpt: Checkpoint | Mapping[str, Any]) -> dict[str, Fused]:
    """Model tensor name -> its per-expert checkpoint tensors (:class:`Fused`), for every tensor transformers'
    converters assemble with the operations understood; the others are absent (no single source: read whole
    experts are refused)."""
    state = named_tensors(model)
    rename = _renamer(model, state)
    found: dict[str, dict[str, dict[int, str]]] = {}
    ops: dict[str, Any] = {}
    for key in _keys(ckpt):
        name, converter = rename(key)
        if not hasattr(converter, "source_patterns") or name not in state:
            continue
        pattern = converter.source_patterns
        hit = next(((p, m) for p in pattern if (m := re.search(_expert_pattern(p), key))), None)
        if hit is None:
            continue
        found.setdefault(name, {}).setdefault(hit[0], {})[int(hit[1].group(1))] = key
        ops[name] = converter
    out: dict[str, Fused] = {}
    for name, by_source in found.items():
        converter = ops[name]
        kinds = tuple((type(o).__name__, getattr(o, "dim", None)) for o in converter.operations)
        if kinds != _FUSING[len(converter.source_patterns) > 1] or set(by_source) != set(converter.source_patterns):
            continue
        keys = tuple(tuple(by_source[p][e] for e in sorted(by_source[p])) for p in converter.source_patterns)
        if len({len(k) for k in keys}) == 1 and all(sorted(by_source[p]) == list(range(len(keys[0])))
                                                     for p in by_source):
            out[name] = Fused(keys, tuple(converter.source_patterns))
    return out


def _expert_pattern(pattern: str) -> str:
    """A converter's source pattern (``.experts.*.w1.weight``) as a regex whose group is the expert number."""
    return re.escape(pattern).replace(r"\*", r"(\d+)")


def _keys(ckpt: Checkpoint | Mapping[str, Any]) -> Any:
    return ckpt.tensors if isinstance(ckpt, Checkpoint) else ckpt


def written_mismatches(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Does ``config`` build (on meta) a model that ``from_pretrained`` fills exactly from checkpoint tensors of
    ``shapes`` (name -> shape)? The tensors it would lack or read at another shape (fused experts assembled from
    theirs), first problems first; empty: it does."""
    model = meta_model(config, model_class(config))
    names, fused = checkpoint_names(model, shapes), fused_sources(model, shapes)
    state = model.state_dict()
    problems = [f"{n} has no tensor" for n in state if n not in names and n not in fused]
    for n, key in names.items():
        if n in state and tuple(state[n].shape) != tuple(shapes[key]):
            problems.append(f"{n} is {tuple(state[n].shape)}, the tensor written {tuple(shapes[key])}")
    for n, f in fused.items():
        assembled = f.assemble(lambda k: torch.empty(tuple(shapes[k]), device="meta"))
        if n in state and tuple(state[n].shape) != tuple(assembled.shape):
            problems.append(f"{n} is {tuple(state[n].shape)}, the tensors written make {tuple(assembled.shape)}")
    return problems


def checkpoint_tensors(ckpt: Checkpoint) -> Callable[[nn.Module], tuple[dict[str, str], dict[str, tuple[int, ...]]]]:
    """What ``analyse_architecture`` asks of a folder: for a model, its tensor names in the checkpoint
    (``checkpoint_names``) and the checkpoint's shapes."""
    return lambda model: (checkpoint_names(model, ckpt), {n: t.shape for n, t in ckpt.tensors.items()})


def _renamer(model: nn.Module, state: dict[str, torch.Tensor]) -> Callable[[str], tuple[str, Any]]:
    """Checkpoint key -> (model name, the transformers converter that merges it with others, or None).
    transformers 5's loading rules where it has them; else the same name with the base-model prefix added or
    dropped."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoints carry the model's own names
        def plain(key: str) -> tuple[str, Any]:
            for cand in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}"):
                if cand in state:
                    return cand, None
            return key, None
        return plain
    rules = get_model_conversion_mapping(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    def renamed(key: str) -> tuple[str, Any]:
        name, pattern = rename_source_key(key, renamings, converters, prefix or None, state)
        return name, (by_pattern.get(pattern, pattern) if pattern is not None else None)
    return renamed
