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
from typing import Any

import numpy as np
import torch

from fxprune.state import named_tensors

from ._calibrate import (
    Calibrated,
    Consumer,
    Solver,
    group_contributions,
    live_outputs,
    mask_,
    reconstruct_into,
    sample_layers,
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
            group = ctx.groups[gid]
            if keep[gid] >= len(group) or not all(c.layer in samples for c in cs):
                continue
            zs, ys = [], []
            for c in cs:
                x, _ = sample_layers(work, [c.layer], batches, self.per_batch, stop_after=c.layer)[c.layer]
                w = named_tensors(work)[c.slot.name].detach().double().cpu()
                contrib = group_contributions(c, x, w, gid, len(group))
                live = live_outputs(w)
                bias = c.module.bias.detach().double().cpu()[live] if c.module.bias is not None else 0.0
                y = samples[c.layer][1][:, live] - bias - contrib[:, :, len(group)]
                zs.append(contrib[:, :, :len(group)].reshape(-1, len(group)).numpy())
                ys.append(y.reshape(-1).numpy())
            z, y = np.concatenate(zs), np.concatenate(ys)
            pick = self.subsample(rng, len(y))
            z, y = z[pick], y[pick]
            rms = max(float(np.sqrt((y * y).mean())), 1e-12)
            beta, _, _ = lasso_select(z / rms, y / rms, keep[gid], self.lam)
            norms = np.linalg.norm(z, axis=0)
            scores[gid] = np.where(beta != 0, np.abs(beta), -1.0 / (1.0 + norms))
            order = np.argsort(-scores[gid], kind="stable")
            removed[group.channels[order[keep[gid]:]]] = True
            mask_(work, ctx.groups, removed, only={gid})
            reconstruct_into(work, ctx, removed, cs, self.solver(), batches, self.per_batch, samples)
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
