"""lasso: Channel Pruning (He, Zhang, Sun, ICCV 2017): LASSO channel selection + least squares.

Groups are processed in graph order (by their first consumer), sequentially: for each group whose
consumers are all Conv2d (groups=1) / Linear layers,

1. Targets Y: the consumers' outputs in the ORIGINAL model, less the contributions of the inputs
   that are not in this group; X: the group's per-channel contributions computed from the copy
   ALREADY pruned and reconstructed up to here (errors do not accumulate). Rows (location, output
   channel) are subsampled to ``rows``; X and Y are divided by Y's RMS so lambda is scale-free.
2. ``sklearn.linear_model.Lasso`` (no intercept) on beta; lambda starts at ``lam`` (1e-3), doubles
   until at most 1.1 c' channels survive, then bisects until the count is in [c', 1.1 c'] (c' = the
   group's keep count under the selection given to prune(): ``ctx.selection`` read in group scope;
   with a MACs/params target search the starting ratio is used). The c' channels with the largest
   |beta| are kept (score = |beta|; channels LASSO zeroed score below every survivor).
3. Least squares from the kept inputs (all kernel taps) to Y, with an intercept when the consumer
   has a bias (it becomes the new bias; a bias-free consumer gets no intercept), a tiny ridge for
   stability: the consumer's new weights, applied to the working copy before the next group.

After selection, :meth:`Lasso.weights` repeats step 3 for the removal actually selected (it may
differ from LASSO's choice under global scope or min_channels) and hands the tensors to compaction.
Groups whose consumers are not conv/linear fall back to the l1 score, unreconstructed.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fxprune.state import named_tensors

from ._calibrate import (
    Calibrated,
    Consumer,
    Sampler,
    Solver,
    group_contributions,
    live_outputs,
    mask_,
    reconstruct_into,
    sample_layers,
    solve_in_layer,
    under,
)
from .base import PassContext, Scores

__all__ = ["Lasso", "lasso_select"]


def lasso_select(z: np.ndarray, y: np.ndarray, keep: int, lam: float = 1e-3,
                 max_iter: int = 40) -> tuple[np.ndarray, float, int]:
    """He et al.'s lambda search: (beta, lambda, surviving count), the count in [keep, 1.1 keep] when reachable."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso as SkLasso

    hi_count = max(keep, int(np.floor(1.1 * keep)))

    def fit(alpha: float) -> tuple[np.ndarray, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            beta = SkLasso(alpha=alpha, fit_intercept=False, max_iter=2000).fit(z, y).coef_
        return beta, int((beta != 0).sum())

    beta, n = fit(lam)
    lo, hi = 0.0, None
    for _ in range(max_iter):  # doubling: find a lambda with at most 1.1 c' survivors
        if n <= hi_count:
            hi = lam
            break
        lo, lam = lam, lam * 2
        beta, n = fit(lam)
    if hi is None or keep <= n <= hi_count:
        return beta, lam, n
    for _ in range(max_iter):  # bisection between too many (lo) and too few (hi)
        lam = (lo + hi) / 2
        beta, n = fit(lam)
        if keep <= n <= hi_count:
            break
        lo, hi = (lam, hi) if n > hi_count else (lo, lam)
    return beta, lam, n


def _keep_counts(ctx: PassContext) -> dict[int, int]:
    from fxprune.selection.budget import Selection, select

    sel = ctx.selection if ctx.selection is not None else Selection()
    sel = dataclasses.replace(sel, scope="group")
    flat = {g.id: np.zeros(len(g)) for g in ctx.groups.prunable}
    removed = select(ctx.groups, flat, sel)
    return {g.id: int((~removed[g.channels]).sum()) for g in ctx.groups.prunable}


@dataclass(frozen=True)
class Lasso(Calibrated):
    name = "lasso"
    graph_only = None  # runs on the modules target too: its calibration hooks the user's modules
    description = "Channel Pruning (He et al. 2017): LASSO selection with bisected lambda, least-squares weights"

    calibrates: ClassVar[bool] = True  # a Hugging Face folder runs it with --calib, one decoder layer at a time

    rows: int = 4000
    lam: float = 1e-3
    ridge: float = 1e-6        # relative ridge in the least squares

    def score_consumed(self, ctx: PassContext, cons: dict[int, list[Consumer]], batches: list[Any],
                       samples: dict[str, tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator) -> Scores:
        keep = _keep_counts(ctx)
        work = copy.deepcopy(ctx.model).eval()
        removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
        scores: Scores = {}
        for gid, cs in sorted(cons.items(), key=lambda kv: min(c.order for c in kv[1])):
            if keep[gid] >= len(ctx.groups[gid]) or not all(c.layer in samples for c in cs):
                continue
            inputs = {c.layer: sample_layers(work, [c.layer], batches, self.per_batch, stop_after=c.layer)[c.layer][0]
                      for c in cs}
            scores[gid] = self._select(ctx, gid, cs, inputs, samples, named_tensors(work), keep[gid], removed, rng)
            mask_(work, ctx.groups, removed, only={gid})
            reconstruct_into(work, ctx, removed, cs, self.solver(), batches, self.per_batch, samples)
        return scores

    def score_streamed(self, ctx: PassContext, cons: dict[int, list[Consumer]]) -> Scores:
        """On a folder, one decoder layer at a time: the same group-by-group selection and reconstruction inside
        each layer (a rewrite of the model whose tensors are not kept: the decision's finish solves the
        consumers again for the removal the budget selects)."""
        keep, rng = _keep_counts(ctx), np.random.default_rng(self.seed)
        removed = np.zeros(len(ctx.groups.comp_group), dtype=bool)
        ordered = sorted(cons.items(), key=lambda kv: min(c.order for c in kv[1]))
        scores: Scores = {}

        def edit(run: Any) -> dict[str, torch.Tensor]:
            mine = [(gid, cs) for gid, cs in ordered if keep[gid] < len(ctx.groups[gid])
                    and all(under(c.layer, run.prefix) for c in cs)]
            target = Sampler(sorted({c.layer for _, cs in mine for c in cs}), self.per_batch, streamed=True)
            if mine:
                run.original(target.hooks())
            for gid, cs in mine:
                sampled = Sampler([c.layer for c in cs], self.per_batch, streamed=True)
                run.rewritten(sampled.hooks())
                inputs = {layer: x for layer, (x, _) in sampled.samples().items()}
                bound = [dataclasses.replace(c, module=run.root.get_submodule(c.layer)) for c in cs]
                scores[gid] = self._select(ctx, gid, bound, inputs, target.samples(), named_tensors(run.root),
                                           keep[gid], removed, rng)
                mask_(run.root, ctx.groups, removed, only={gid})
                solve_in_layer(run, ctx, removed, sorted(cs, key=lambda c: c.order), self.solver(), self.per_batch,
                               target.samples())
            return {}

        assert ctx.calibrate is not None
        ctx.calibrate.rewrite(edit)
        return scores

    def _select(self, ctx: PassContext, gid: int, cs: list[Consumer], inputs: dict[str, torch.Tensor],
                targets: dict[str, tuple[torch.Tensor, torch.Tensor]], state: dict[str, torch.Tensor], keep: int,
                removed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """He et al.'s LASSO over group ``gid``'s channels: each consumer's output (``targets``, the original
        model's) less its other inputs' part, from each channel's contribution (``inputs``, the model pruned so
        far); the ``keep`` channels with the largest |beta| stay, the rest are marked in ``removed``."""
        group = ctx.groups[gid]
        zs, ys = [], []
        for c in cs:
            w = state[c.slot.name].detach().double().cpu()
            contrib = group_contributions(c, inputs[c.layer], w, gid, len(group))
            live = live_outputs(w)
            bias = c.module.bias.detach().double().cpu()[live] if c.module.bias is not None else 0.0
            y = targets[c.layer][1][:, live] - bias - contrib[:, :, len(group)]
            zs.append(contrib[:, :, :len(group)].reshape(-1, len(group)).numpy())
            ys.append(y.reshape(-1).numpy())
        z, y = np.concatenate(zs), np.concatenate(ys)
        pick = self.subsample(rng, len(y))
        z, y = z[pick], y[pick]
        rms = max(float(np.sqrt((y * y).mean())), 1e-12)
        beta, _, _ = lasso_select(z / rms, y / rms, keep, self.lam)
        norms = np.linalg.norm(z, axis=0)
        scores = np.where(beta != 0, np.abs(beta), -1.0 / (1.0 + norms))
        order = np.argsort(-scores, kind="stable")
        removed[group.channels[order[keep:]]] = True
        return scores

    def solver(self) -> Solver:
        return functools.partial(_least_squares, ridge=self.ridge)


def _least_squares(c: Consumer, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, unit: np.ndarray,
                   gone: np.ndarray, ridge: float = 1e-6) -> dict[str, torch.Tensor]:
    """New consumer weights (and bias) from the kept inputs (every kernel tap) to the original outputs."""
    kept = torch.as_tensor(np.nonzero(~gone)[0])
    rows = live_outputs(w)
    feats = x[:, kept, :].reshape(len(x), -1)                       # (S, k*K)
    has_bias = getattr(c.module, "bias", None) is not None
    if has_bias:
        feats = torch.cat([feats, torch.ones(len(x), 1, dtype=feats.dtype)], 1)
    gram = feats.T @ feats
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.solve(gram, feats.T @ y[:, rows])            # (k*K [+1], O_kept)
    wk = w.reshape(w.shape[0], w.shape[1], -1).clone()
    wk[:, gone] = 0
    new_rows = sol[:-1] if has_bias else sol
    block = wk[rows]
    block[:, kept] = new_rows.T.reshape(int(rows.sum()), len(kept), -1)
    wk[rows] = block
    out = {c.slot.name: wk.reshape(w.shape).to(c.module.weight.dtype)}
    if has_bias:
        b = c.module.bias.detach().double().cpu().clone()
        b[rows] = sol[-1]
        out[c.layer + ".bias" if c.layer else "bias"] = b.to(c.module.bias.dtype)
    return out
