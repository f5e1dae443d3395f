"""Depth pruning of a decoder-only language model folder: score each decoder block on calibration text, streamed
from disk, and write a folder without the least important ones.

    score     ``bi``: ShortGPT's block influence (Men et al. 2024), 1 - the mean cosine similarity of a block's
              input and output hidden states, one pass over the text; ``ppl``: Minitron's, the perplexity of the
              model with that one block skipped (one pass per block)
    choose    the ``k`` lowest-scoring blocks: ``k`` from a ratio of the blocks, or blocks removed in order of
              importance until the parameters fit a target
    write     the kept blocks' tensors renumbered 0..n-k-1 (``model.layers.5.`` -> ``model.layers.3.``), the
              removed ones left out; ``num_hidden_layers`` and every per-layer list of config.json
              (``layer_types``...) rewritten; then checked: the new config builds (on meta) exactly the tensors
              written
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .architecture import written_mismatches
from .calibration import Calibration, TextData
from .folder import Checkpoint, CheckpointError
from .stream import DecoderStream
from .text import Windows
from .units import least, removal_count

__all__ = ["SCORES", "block_importance", "choose_blocks", "depth_plan", "DepthPlan", "DepthResult", "drop_blocks"]

SCORES = ("bi", "ppl")


def block_importance(stream: DecoderStream, windows: Windows, score: str = "bi") -> list[float]:
    """Per decoder block, how much the model needs it (higher: keep), by ``score`` (see the module's doc)."""
    if score not in SCORES:
        raise CheckpointError(f"unknown block score {score!r}: one of {', '.join(SCORES)}")
    if score == "bi":
        return [1.0 - c for c in stream.run(windows.batches).cosine]
    base = stream.run(windows.batches, tail=True).perplexity
    return [stream.run(windows.batches, skip={i}, tail=True).perplexity - base for i in range(len(stream.layers))]


def choose_blocks(importance: list[float], block_params: int, total_params: int, *, blocks: int | None = None,
                  ratio: float | None = None, target_params: float | None = None) -> list[int]:
    """The blocks to remove, least important first: ``blocks`` of them, or ``round(ratio * n)``, or as many as
    bring the parameters to ``target_params`` of ``total_params`` (each block holds ``block_params``). At least
    one block is kept."""
    k = removal_count(len(importance), block_params, total_params, count=blocks, ratio=ratio,
                      target_params=target_params, what="decoder blocks")
    return least(np.asarray(importance), k)


@dataclass
class DepthPlan:
    """What the pruned folder holds: checkpoint name -> its new name (absent: removed), and the new config."""

    rename: dict[str, str]
    config: dict
    removed: list[int]


def depth_plan(stream: DecoderStream, removed: list[int]) -> DepthPlan:
    """Renumber the kept blocks' tensors and rewrite config.json (see the module's doc); checked against the
    architecture the new config builds."""
    n = len(stream.layers)
    gone = set(removed)
    new_index = {old: new for new, old in enumerate(i for i in range(n) if i not in gone)}
    seg = re.escape(stream.path.rpartition(".")[2])
    owner = _owners(stream)
    rename: dict[str, str] = {}
    for key in stream.ckpt.tensors:
        layer = owner.get(key)
        if layer is None:
            rename[key] = key
            continue
        if layer in new_index:
            new, count = re.subn(rf"(^|\.)({seg})\.{layer}\.", rf"\g<1>\g<2>.{new_index[layer]}.", key, count=1)
            if not count:
                raise CheckpointError(f"{key}: fxprune cannot find its block number to renumber it")
            rename[key] = new
    config = _config_without(stream.ckpt.config, removed, n)
    _check(stream, rename, config)
    return DepthPlan(rename, config, sorted(removed))


def _owners(stream: DecoderStream) -> dict[str, int]:
    """Checkpoint name -> the decoder block holding it (tensors outside the blocks are absent); the per-expert
    tensors of a fused expert tensor belong to its block."""
    prefix = stream.path + "."
    pairs = [(name, key) for name, key in stream.names.items()]
    pairs += [(name, key) for name, f in stream.fused.items() for keys in f.keys for key in keys]
    return {key: int(name[len(prefix):].split(".", 1)[0]) for name, key in pairs if name.startswith(prefix)}


def _config_without(config: dict, removed: list[int], n: int) -> dict:
    """config.json with ``num_hidden_layers`` lowered and every list of one entry per block without the removed
    blocks' entries (in the config and its ``text_config``)."""
    def edit(c: dict) -> dict:
        out = dict(c)
        if out.get("num_hidden_layers") == n:
            out["num_hidden_layers"] = n - len(removed)
            for k, v in c.items():
                if isinstance(v, list) and len(v) == n:
                    out[k] = [x for i, x in enumerate(v) if i not in set(removed)]
        return out

    new = edit(config)
    if isinstance(config.get("text_config"), dict):
        new["text_config"] = edit(config["text_config"])
    if new.get("num_hidden_layers", (new.get("text_config") or {}).get("num_hidden_layers")) != n - len(removed):
        raise CheckpointError("config.json has no num_hidden_layers to rewrite: fxprune cannot remove blocks here")
    return new


def _check(stream: DecoderStream, rename: dict[str, str], config: dict) -> None:
    """The new config builds, on meta, a model whose checkpoint names and shapes are exactly those written."""
    problems = written_mismatches(type(stream.config).from_dict(config),
                                  {new: stream.ckpt.tensors[old].shape for old, new in rename.items()})
    if problems:
        raise CheckpointError(f"the rewritten config.json does not describe the kept blocks' tensors "
                              f"({problems[0]}): fxprune cannot remove blocks from this architecture")


def block_params(ckpt: Checkpoint, stream: DecoderStream) -> tuple[int, int]:
    """Parameters of one decoder block (the first) and of the whole checkpoint."""
    owner = _owners(stream)
    per = sum(int(np.prod(t.shape)) for key, t in ckpt.tensors.items() if owner.get(key) == 0)
    return per, sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())


@dataclass
class DepthResult:
    out: Path                   # the folder written
    removed: list[int]          # the blocks removed (their indices in the source)
    importance: list[float]     # per block of the source, by the pass's score
    config: dict                # the config.json written
    report: dict[str, Any]


def drop_blocks(ckpt: Checkpoint, out: Path, the_pass: Any, budget: Any, calib: Calibration, text: TextData,
                shard_bytes: int | None, force: bool, progress: Callable[[str], None] | None) -> DepthResult:
    """``prune_checkpoint`` for the depth pass: score the blocks on the calibration text, choose, write ``out``
    (staged: never half-written), with the perplexity before and after when ``text.eval_text`` is given."""
    from fxprune.artifacts import staging_folder, write_json
    from fxprune.selection.budget import SelectionError

    from .steps import Clock, measure_perplexity, recorded_notes
    from .write import write_checkpoint

    with recorded_notes() as notes:
        clock = Clock(progress, ("read", "score", "select", "write"))
        stream, windows = calib.stream, calib.windows
        clock.lap("read")
        importance = calib.timed(lambda: block_importance(stream, windows, the_pass.by))
        clock.lap("score")
        which, resource = budget.resource
        if resource is not None and which != "params" and not the_pass.blocks:
            raise SelectionError(f"depth removes whole blocks: give --ratio (the fraction of blocks), --opt blocks=N "
                                 f"or --target-params, not a {which} target")
        per, total = block_params(ckpt, stream)
        removed = choose_blocks(importance, per, total, blocks=the_pass.blocks or None, ratio=budget.ratio,
                                target_params=resource if resource is not None and which == "params" else None)
        plan = depth_plan(stream, removed)
        clock.lap("select")
        n = len(stream.layers)
        report = {"source": str(ckpt.root), "architecture": type(stream.model).__name__, "pass": the_pass.name,
                  "ratio": budget.ratio, "target": {which: float(resource)} if resource is not None else {},
                  "by": the_pass.by, "blocks": {"before": n, "after": n - len(removed), "removed": plan.removed},
                  "importance": importance, "params": {"before": total, "after": total - per * len(removed)},
                  "config_changes": {k: [v, plan.config.get(k)] for k, v in ckpt.config.items()
                                     if plan.config.get(k) != v},
                  "loadable": True, "calibration": calib.info}
    report["notes"] = notes
    with staging_folder(out, force=force) as tmp:
        write_checkpoint(ckpt, {}, tmp, plan.config, shard_bytes or ckpt.shard_bytes(), rename=plan.rename)
        clock.lap("write")
        report["seconds"] = clock.seconds()
        measure_perplexity(report, ckpt, tmp, text, True)
        write_json(report, tmp / "report.json")
    return DepthResult(out.resolve(), plan.removed, importance, plan.config, report)
