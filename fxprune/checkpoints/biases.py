"""New bias tensors for a pruned folder (FLAP's bias compensation, ``act --opt compensate=true``): a layer that has
no bias gets one through the config.json flag that gives its family's projections biases (``mlp_bias``,
``attention_bias``); the flag's other new biases are written as zeros, so every layer computes what it did.

    find      per flag the family's config has off: the tensors turning it on adds (the model rebuilt on meta)
    choose    the flags whose tensors hold a compensated bias; a layer no flag gives a bias is pruned without
              compensation, and a warning names it
    write     the compensated biases (sliced as their layer's output) and zeros for the rest, in the
              checkpoint's dtype; then checked: the new config builds exactly the tensors written
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fxprune.compaction.plan import Plan, slice_tensor
from fxprune.state import named_tensors

from .architecture import written_mismatches
from .folder import CheckpointError

__all__ = ["BIAS_FLAGS", "with_biases"]

BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias")  # config fields that give projections biases


def with_biases(arch: Any, config: dict, new: Mapping[str, torch.Tensor], plan: Plan, dtype: torch.dtype,
                shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config`` with the flags that create the biases ``new`` (model name -> full-size tensor) turned on, and
    every tensor those flags add (model name -> tensor at its written shape): ``new``'s sliced by the plan of
    their layer's weight, zeros for the others. ``shapes``: checkpoint name -> shape of what is written besides."""
    have = set(named_tensors(arch.build(config)))
    made: dict[str, set[str]] = {}
    for flag in BIAS_FLAGS:
        if flag in config and config[flag] is False:
            made[flag] = set(named_tensors(arch.build({**config, flag: True}))) - have
    flags = [f for f, names in made.items() if names & set(new)]
    covered = set().union(*(made[f] for f in flags))
    missing = sorted(set(new) - covered)
    if missing:
        warnings.warn(f"fxprune: {len(missing)} layers have no bias and no config.json field ({', '.join(BIAS_FLAGS)})"
                      f" gives them one ({', '.join(missing[:2])}{'...' if len(missing) > 2 else ''}): they are "
                      "pruned without compensation", stacklevel=5)
    final = {**config, **{f: True for f in flags}}
    state = named_tensors(arch.build(final))
    out: dict[str, torch.Tensor] = {}
    for name in sorted(covered):
        if name in new:
            entry = plan.get(name.rpartition(".")[0] + ".weight") or {}
            t = slice_tensor({0: entry[0]} if 0 in entry else {}, new[name])
        else:
            t = torch.zeros(tuple(state[name].shape))
        out[name] = t.to(dtype)
    problems = written_mismatches(type(arch.config).from_dict(final),
                                  {**shapes, **{n: tuple(t.shape) for n, t in out.items()}})
    if problems:
        raise CheckpointError(f"the config.json with {', '.join(flags)} does not describe the tensors written "
                              f"({problems[0]}): fxprune cannot add the compensated biases to this architecture")
    return final, out
