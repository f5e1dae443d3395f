"""Trainable channel masks in the traced graph, and folding them back into the weights.

    insert.py   insert_masks(gm, groups, factory) -> MaskedModel: one mask module per channel group
    sites.py    where a group's mask acts (normalisation / producer outputs; weights zeroed in eval)
    apply.py    the modules that apply mask values (on weights, inside a BatchNorm, or on activations)
    kinds.py    mask kinds every method can start from (Scale, Fixed)
    fold.py     fold(masked) -> new full-size weights + the removal, for compaction's ``weights=``
    train.py    train_masked(masked, data, ...): the learned passes' one recipe (the engine, eval, evaluate)

Every method that learns something per channel (slimming's scales without BatchNorm, scratch's gates,
ANP's Bayesian masks, TAS's width distributions, SANP's per-sample gates, FLOP's rank masks) builds on
this one mechanism and trains through ``train_masked``: the training engine trains masks and weights in separate
optimisers, jointly or alternating on two data splits; each pass keeps its mask kind, loss terms and schedule.
"""
from .fold import Folded, fold
from .insert import MaskedModel, insert_masks
from .kinds import Fixed, Scale
from .sites import PLACEMENTS

__all__ = ["insert_masks", "MaskedModel", "fold", "Folded", "Scale", "Fixed", "PLACEMENTS"]
