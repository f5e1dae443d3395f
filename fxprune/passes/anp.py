"""anp: Adversarial Neural Pruning with Vulnerability Suppression (Madaan, Shin & Hwang, ICML 2020).

Defaults follow the authors' released code (TensorFlow; CIFAR-10 settings unless said otherwise).

- Masks: one Beta-Bernoulli mask per channel of every prunable group (:class:`BetaBernoulli`, a mask kind
  of ``fxprune.masking``): a Kumaraswamy(a, b) posterior over the keep probability pi, ``a =
  softplus(a_raw)``, ``b = softplus(b_raw)``, ``b_raw = 0.5413`` (b = 1). fxprune's default ``a_raw`` is 32 on
  every channel (E[pi] = 0.97): fxprune starts from the user's trained network, and the authors' start
  (``a_raw = 2.0`` on convolution channels, E[pi] = 0.68; ``-1.0`` on fully connected units, E[pi] = 0.24;
  ``preset=paper``) drops a third of every layer's channels per sample, which a deep narrow network does not
  survive (an inverted-residual net with depthwise convolutions went from 99.7% to chance before training,
  and stayed there; a ViT, all of whose units start at 0.24, ended at 56-69%). Prior Beta(1e-4, 1); the KL of
  the posterior from it in closed form (:func:`kumaraswamy_beta_kl`).
  Training: pi from the Kumaraswamy inverse CDF (one draw per channel and step), then a relaxed
  Bernoulli z per sample and channel at temperature 0.1. Evaluation: z = E[pi], and 0 where E[pi] <=
  ``threshold`` (1e-3): those channels are pruned; the survivors keep their soft scale, folded into
  the weights (``masked.fold``), so the compacted model computes what the masked network computes.
- Where a mask acts (``placement``): ``"output"`` (the default) multiplies the channel after its
  normalisation (a conv's BatchNorm output), so a pruned channel is exactly zero and compaction is
  exact at every position; ``"prenorm"`` is the authors' VGG placement, after the conv and before the
  BatchNorm: a pruned channel then emits the BatchNorm's constant, carried into the next layer's bias,
  which is exact away from zero-padded borders only (``fxprune.masking.fold``). What "channel" means is
  the analysis's channel group: a CNN's filters (a residual stream's channels share one mask), a ViT's
  attention heads and MLP units, an MLP's hidden units.
- Attack: PGD L-inf with a uniform random start, clipped to the batch's input range
  (``fxprune.robustness.PGD``): ``eps`` 0.03, ``step_size`` 0.007, ``steps`` 10 to train (the authors'
  CIFAR-10; MNIST: 0.3 / 0.01 / 20), ``eval_steps`` 40 to evaluate. Adversarial examples are made with
  the network in eval mode (BatchNorm statistics untouched by the attack, masks at E[pi]), as common
  adversarial-training code does; the losses then run in training mode.
- Vulnerability: mean |f(x) - f(x_adv)| of every post-activation feature of the graph (the activations
  ``fxprune.robustness`` reads); the VS loss is its mean over them.
- Losses: weights minimise ``(CE(x) + 2 CE(x_adv)) / 3 + beta KL / N + vs_weight VS + l2 * sum(w^2) / 2``;
  masks minimise ``CE(x_adv) + beta KL / N``. ``update="joint"`` (the default, the authors' two train ops
  grouped): both step together on one batch and one attack, each on its own loss (the masks' gradient
  taken from theirs on the same forward, :class:`JointGrads`); ``"alternate"``: a weight step, then a mask
  step on the next batch with its own attack. N = the training set's size, at least ``kl_n_min`` (50000, CIFAR-10's:
  fxprune's, so that the prior weighs on each example at most as it does in the authors' runs; on 1437 images the
  ELBO's KL/N is 35x theirs and drives every keep probability down together; ``kl_n_min=0``, ``preset=paper``:
  the training set's size). CE is the model file's
  ``loss()`` (cross-entropy by default). Adam, ``lr_weight`` 1e-3, ``lr_mask`` 1e-2, both x0.1 at 50%
  and 80% of ``epochs`` (with the budget schedule: of the epochs after the cut). ``beta`` / ``vs_weight``:
  2 / 1e-4 (CIFAR-10; CIFAR-100: 1 / 0.1; MNIST: 4 / 1e-3).
- Variants (``variant``): ``standard`` (clean training, no masks), ``bp`` (masks, clean training),
  ``at`` (adversarial training), ``at-vs`` (+ VS), ``anp`` (masks + adversarial training), ``anp-vs``
  (the default: all of it). Without an attack the clean loss replaces the adversarial one in both phases.
- Budget (``schedule``): the authors prune only what E[pi] <= ``threshold`` removes during training
  (``schedule="threshold"``); a budget beyond it then cuts by E[pi] after training, with nothing to recover
  the cut. fxprune's default ``"budget"`` (:class:`KeepBudget`) asks the run's budget at every epoch from
  20% of the epochs on which channels it would remove under the current E[pi], and holds their ``a_raw``
  under a bound falling linearly to -8 (E[pi] about 3e-4) by 60% of the epochs: by then the budget's
  channels are pruned by the method's own threshold and the last 40% of the epochs train the network
  adversarially without them, so the result is on budget and the cut costs nothing more. The rates' x0.1
  steps then fall at 50% and 80% of those last epochs: the network needs the full rate to adapt to the
  cut (on a plain digits CNN the pruned network ends 6 points higher than with the steps at 50% and 80%
  of the whole run).
- Scores: E[pi] per channel, ``-inf`` where E[pi] <= ``threshold`` (the method's own pruning: those always
  go). Selection is global over E[pi] (no normalisation): ``--ratio 0`` keeps exactly what ANP keeps;
  a budget (``--ratio``, ``--target-macs``) removes more, lowest E[pi] first. Variants without masks
  (``standard``, ``at``, ``at-vs``: the paper's dense baselines) score by the L1 norm of their trained
  filters, each group rescaled to mean 1, so ``--ratio 0`` keeps them dense and a budget prunes them
  like ``l1`` on the trained weights.
- Output: the trained network (masks folded) restricted to the kept channels; recovery does not run by
  default (``--epochs N`` fine-tunes with the clean loss, which costs robustness). The CLI reports clean
  accuracy, PGD accuracy (``eval_steps`` steps) and vulnerability before and after with this pass's
  attack unless ``--attack`` is given.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.analysis.groups import Group
from fxprune.masking import MaskedModel
from fxprune.masking.train import train_masked, trained_metrics
from fxprune.recovery.engine import Hook, TrainState
from fxprune.robustness import ACTIVATIONS, PGD
from fxprune.state import attribute, seeded

from ._scales import rescaled_l1
from .base import Decision, Finish, Pass, PassContext, Scores
from .registry import PassError

__all__ = ["KeepFolded", "Anp", "BetaBernoulli", "kumaraswamy_beta_kl", "kumaraswamy_mean", "VARIANTS"]

EULER_GAMMA = 0.5772156649015329
VARIANTS: dict[str, tuple[bool, bool, bool]] = {  # variant -> (masks, adversarial training, vulnerability suppression)
    "standard": (False, False, False), "bp": (True, False, False), "at": (False, True, False),
    "at-vs": (False, True, True), "anp": (True, True, False), "anp-vs": (True, True, True)}
_EPS = 1e-6


def kumaraswamy_beta_kl(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)), elementwise, in closed form (Nalisnick & Smyth 2017; the
    Taylor series of the general case is multiplied by (beta - 1) = 0 for this prior)."""
    return (1 - alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1 / b) + torch.log(a * b / alpha) - (b - 1) / b


def kumaraswamy_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[pi] of Kumaraswamy(a, b): ``b B(1 + 1/a, b)``."""
    return b * torch.exp(torch.lgamma(1 + 1 / a) + torch.lgamma(b) - torch.lgamma(1 + 1 / a + b))


class BetaBernoulli(nn.Module):
    """A per-sample Beta-Bernoulli channel mask (see the module docstring): ``forward(x)`` returns
    (batch, channels); sampled in training mode, ``keep()`` in eval mode."""

    per_sample = True

    def __init__(self, channels: int, a_init: float = 2.0, b_init: float = 0.5413, alpha: float = 1e-4,
                 temperature: float = 0.1, threshold: float = 1e-3) -> None:
        super().__init__()
        self.alpha, self.temperature, self.threshold = alpha, temperature, threshold
        self.a_raw = nn.Parameter(torch.full((channels,), float(a_init)))
        self.b_raw = nn.Parameter(torch.full((channels,), float(b_init)))

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softplus(self.a_raw), F.softplus(self.b_raw)

    def expected(self) -> torch.Tensor:
        """E[pi] per channel."""
        return kumaraswamy_mean(*self.ab())

    def keep(self) -> torch.Tensor:
        """The evaluation mask: E[pi], 0 where it is at or under the threshold."""
        e = self.expected()
        return torch.where(e > self.threshold, e, torch.zeros_like(e))

    def kl(self) -> torch.Tensor:
        """KL of the posterior from the prior, summed over channels."""
        a, b = self.ab()
        return kumaraswamy_beta_kl(a, b, self.alpha).sum()

    def sample_pi(self) -> torch.Tensor:
        """pi ~ Kumaraswamy(a, b) by the inverse CDF (one draw per channel)."""
        a, b = self.ab()
        u = torch.rand_like(a).clamp(_EPS, 1 - _EPS)
        return (1 - u.pow(1 / b)).pow(1 / a).clamp(_EPS, 1 - _EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n = x.shape[0], self.a_raw.shape[0]
        if not self.training:
            return self.keep().unsqueeze(0).expand(batch, n)
        pi = self.sample_pi()
        u = torch.rand(batch, n, device=pi.device).clamp(_EPS, 1 - _EPS)
        return torch.sigmoid((torch.logit(u) + torch.logit(pi)) / self.temperature)


class Tap(nn.Module):
    """An identity that keeps what passes through it in a shared list."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        super().__init__()
        self.store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.store.append(x)
        return x


def with_features(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A GraphModule sharing ``gm``'s modules and tensors with a :class:`Tap` after every activation (the
    post-activation features vulnerability is measured on), and the list the taps fill on each forward."""
    graph = copy.deepcopy(gm.graph)  # keeps the output's structure (its codegen)
    store: list[torch.Tensor] = []
    taps = nn.Module()
    acts = [n for n in graph.nodes if n.op == "call_function" and n.target in ACTIVATIONS]
    for i, node in enumerate(acts):
        taps.add_module(f"t{i}", Tap(store))
        with graph.inserting_after(node):
            tap = graph.call_module(f"fxprune_taps.t{i}", (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda u, tap=tap: u is not tap)
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module") and n.target not in root:
            root[n.target] = taps.get_submodule(n.target.split(".", 1)[1]) if n.target.startswith("fxprune_taps.") \
                else attribute(gm, n.target)
    return fx.GraphModule(root, graph), store


class Output(NamedTuple):
    clean: torch.Tensor | None          # logits on x (None when this phase's loss does not read them)
    adv: torch.Tensor | None            # logits on x_adv (None without an attack)
    vulnerability: torch.Tensor | None  # mean |f(x) - f(x_adv)| over the activations (with both and VS)


class Adversarial(nn.Module):
    """The masked network as the engine trains it: ``forward(x, y)`` attacks (eval mode), then runs what
    the current ``phase``'s loss needs, in the module's own mode."""

    def __init__(self, gm: fx.GraphModule, attack: PGD | None, loss_fn: Callable[[Any, Any], torch.Tensor],
                 suppress: bool) -> None:
        super().__init__()
        self.net, self.store = with_features(gm) if suppress else (gm, [])
        self.attack, self.loss_fn, self.suppress = attack, loss_fn, suppress
        self.phase = "weights"

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.store.clear()
        out = self.net(x)
        feats = list(self.store)
        self.store.clear()
        return out, feats

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Output:
        adv = None
        if self.attack is not None:
            was = self.net.training
            self.net.eval()
            try:
                adv = self.attack(self.logits, x, y, self.loss_fn)
            finally:
                self.net.train(was)
        clean = clean_feats = None
        if adv is None or self.phase != "masks":
            clean, clean_feats = self._run(x)
        if adv is None:
            return Output(clean, None, None)
        adv_logits, adv_feats = self._run(adv)
        vuln = None
        if self.suppress and clean_feats:
            vuln = torch.stack([(a - b).abs().mean() for a, b in zip(clean_feats, adv_feats)]).mean()
        return Output(clean, adv_logits, vuln)


def task_loss(loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Output, Any], torch.Tensor]:
    """The engine's loss: ``(CE(x) + 2 CE(x_adv)) / 3`` when both are there, else the one there is."""
    def loss(out: Output, y: Any) -> torch.Tensor:
        if out.adv is None:
            return loss_fn(out.clean, y)
        if out.clean is None:
            return loss_fn(out.adv, y)
        return (loss_fn(out.clean, y) + 2 * loss_fn(out.adv, y)) / 3
    return loss


class Labelled:
    """A loader of ``(x, y)`` as one of ``((x, y), y)``: the wrapped model needs the labels to attack."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        for x, y in self.loader:
            yield (x, y), y

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class AnpHook(Hook):
    """The KL term (both phases), VS and L2 (the weights' phase), the phase for the model, and the x0.1
    learning-rate steps at 50% and 80% of the epochs (both optimisers)."""

    def __init__(self, model: Adversarial, masks: list[BetaBernoulli], beta: float, n: int, vs_weight: float,
                 l2: float, decayed: list[nn.Parameter], rates: tuple[float, float], decay_from: int = 0) -> None:
        self.model, self.masks, self.beta, self.n = model, masks, beta, n
        self.vs_weight, self.l2, self.decayed, self.rates = vs_weight, l2, decayed, rates
        self.decay_from = decay_from  # the x0.1 steps fall at 50% and 80% of the epochs from this one on

    def before_epoch(self, state: TrainState) -> None:
        left = state.epochs - self.decay_from
        factor = 0.1 ** sum(state.epoch >= self.decay_from + int(m * left) for m in (0.5, 0.8))
        for opt, rate in ((state.optimizer, self.rates[0]), (state.mask_optimizer, self.rates[1])):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"] = rate * factor

    def before_forward(self, state: TrainState) -> None:
        self.model.phase = state.phase

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        terms = []
        if self.masks:
            terms.append(self.beta * torch.stack([m.kl() for m in self.masks]).sum() / self.n)
        if state.phase != "masks":
            if self.vs_weight and output.vulnerability is not None:
                terms.append(self.vs_weight * output.vulnerability)
            if self.l2 and self.decayed:
                terms.append(self.l2 * 0.5 * torch.stack([w.pow(2).sum() for w in self.decayed]).sum())
        return torch.stack(terms).sum() if terms else None


class JointGrads(Hook):
    """The authors' one-step update (``update="joint"``): weights and masks step together on one batch and one
    attack, each on its own loss: the engine backpropagates the weights' loss; the masks' gradients are
    replaced by those of theirs, ``CE(x_adv) + beta KL / N``, computed on the same forward."""

    def __init__(self, masks: list[nn.Parameter], kl: Callable[[], torch.Tensor],
                 loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.masks, self.kl, self.loss_fn = masks, kl, loss_fn
        self.grads: tuple[torch.Tensor, ...] | None = None

    def loss(self, state: TrainState, output: Any, target: Any) -> torch.Tensor | None:
        if state.phase == "joint" and self.masks:
            task = self.loss_fn(output.adv if output.adv is not None else output.clean, target)
            self.grads = torch.autograd.grad(task + self.kl(), self.masks, retain_graph=True, allow_unused=True)
        return None

    def after_backward(self, state: TrainState) -> None:
        if self.grads is None:
            return
        for p, g in zip(self.masks, self.grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        self.grads = None


class KeepBudget(Hook):
    """fxprune's budget schedule (``schedule="budget"``): from epoch ``start`` on, at the start of every epoch the
    run's budget (``select``, as slimming's adaptive schedule asks it) names the channels it would remove under the
    current E[pi]; after every step their ``a_raw`` is held under a bound that falls linearly from the largest
    ``a_raw`` to ``floor`` (E[pi] about 3e-4, under the threshold) between epochs ``start`` and ``end``, and stays
    there: by ``end`` the budget's channels are pruned by the method's own threshold, and the remaining epochs
    train the network (adversarially) without them."""

    def __init__(self, masks: dict[int, BetaBernoulli], groups: Any, select: Callable[[Scores], np.ndarray],
                 start: int, end: int, floor: float = -8.0) -> None:
        self.masks, self.groups, self.select = masks, groups, select
        self.start, self.end, self.floor = start, end, floor
        self.chosen: dict[int, torch.Tensor] = {}
        self.top: float | None = None

    def before_epoch(self, state: TrainState) -> None:
        if state.epoch < self.start:
            return
        if self.top is None:
            self.top = max(float(m.a_raw.detach().max()) for m in self.masks.values())
        with torch.no_grad():
            scores: Scores = {g.id: np.full(len(g), np.inf) for g in self.groups.prunable}
            scores.update({gid: m.expected().double().cpu().numpy() for gid, m in self.masks.items()})
        removed = self.select(scores)
        self.chosen = {gid: torch.as_tensor(removed[self.groups[gid].channels], device=m.a_raw.device)
                       for gid, m in self.masks.items()}

    def bound(self, state: TrainState) -> float:
        if state.batches:  # by step
            first, last = self.start * state.batches, max(self.end * state.batches, self.start * state.batches + 1)
            t = (state.step + 1 - first) / (last - first)
        else:  # a loader without a length: by epoch
            t = (state.epoch + 1 - self.start) / max(self.end - self.start, 1)
        t = min(max(t, 0.0), 1.0)
        return (self.top if self.top is not None else 0.0) * (1 - t) + self.floor * t

    def after_step(self, state: TrainState) -> None:
        if not self.chosen:
            return
        bound = self.bound(state)
        with torch.no_grad():
            for gid, m in self.masks.items():
                chosen = self.chosen[gid]
                m.a_raw[chosen] = m.a_raw[chosen].clamp(max=bound)


def _dataset_size(loader: Any) -> int:
    """The training set's size: a DataLoader's dataset, the samples of a list of ``(x, y)`` batches, else the
    batches times the loader's batch size."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        if isinstance(loader, (list, tuple)):
            return sum(len(b[0]) if isinstance(b, (list, tuple)) else len(b) for b in loader) or 1
        return len(loader) * int(getattr(loader, "batch_size", None) or 1)


@dataclass(frozen=True)
class Anp(Pass):
    name = "anp"
    graph_only = "its Bayesian masks act on activations, per sample, inside the traced graph"
    description = ("Adversarial Neural Pruning with vulnerability suppression (Madaan et al. 2020): Beta-Bernoulli "
                   "channel masks learned with adversarial training; reports PGD robustness")
    scope = "global"
    normalize = "none"
    needs = ("train_loader",)
    presets = {"paper": {"epochs": 200, "update": "joint", "schedule": "threshold", "a_init_conv": 2.0,
                         "a_init_fc": -1.0, "kl_n_min": 0}}  # ANP_VS, CIFAR-10
    recovery_epochs: ClassVar[int | None] = 0  # the trained network is the result; --epochs N fine-tunes (clean)
    self_pruning = True  # E[pi] <= threshold goes even at ratio 0

    variant: str = "anp-vs"
    eps: float = 0.03           # PGD L-inf radius, in input units (MNIST: 0.3)
    step_size: float = 0.007    # PGD step (MNIST: 0.01)
    steps: int = 10             # PGD steps to train (MNIST: 20)
    eval_steps: int = 40        # PGD steps to evaluate (the CLI's robustness report)
    epochs: int = 10            # training epochs (the budget's cut by 60%, then 40% without those channels)
    beta: float = 2.0           # KL weight (CIFAR-100: 1, MNIST: 4)
    vs_weight: float = 1e-4     # VS weight lambda (CIFAR-100: 0.1, MNIST: 1e-3)
    lr_mask: float = 1e-2
    lr_weight: float = 1e-3
    l2: float = 1e-4            # weight decay as an L2 term on conv/linear weights, weights' loss only
    alpha: float = 1e-4         # prior Beta(alpha, 1)
    temperature: float = 0.1    # relaxed Bernoulli
    threshold: float = 1e-3     # E[pi] at or under it: pruned
    a_init_conv: float = 32.0   # initial a_raw on convolution channels (E[pi] 0.97; the authors': 2.0, E[pi] 0.68)
    a_init_fc: float = 32.0     # initial a_raw on fully connected units (the authors': -1.0, E[pi] 0.24)
    kl_n_min: int = 50000       # N in beta KL / N is at least this (CIFAR-10's size; 0: the training set's)
    b_init: float = 0.5413
    placement: str = "output"   # "output" (exact compaction) or "prenorm" (the authors': before BatchNorm)
    update: str = "joint"       # "joint" (the authors': one step, one attack) or "alternate" (two batches)
    schedule: str = "budget"    # "budget" (fxprune's: the budget's channels driven under the threshold) or
    #                             "threshold" (the authors': only E[pi] <= threshold, a budget cuts after training)
    seed: int = 0
    preset: str = ""            # "paper": the authors' schedule (threshold pruning only, joint update, 200 epochs)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PassError(f"anp: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.update not in ("joint", "alternate") or self.schedule not in ("budget", "threshold"):
            raise PassError(f"anp: update must be 'joint' or 'alternate' and schedule 'budget' or 'threshold', got "
                            f"{self.update!r}, {self.schedule!r}")
        if self.placement not in ("output", "prenorm"):
            raise PassError(f"anp: placement must be 'output' or 'prenorm', got {self.placement!r}")
        if self.epochs < 0 or self.steps < 1 or self.eval_steps < 1:
            raise PassError(f"anp: epochs must be >= 0 and steps, eval_steps >= 1; got epochs={self.epochs}, "
                            f"steps={self.steps}, eval_steps={self.eval_steps}")
        if not (self.eps > 0 and self.step_size > 0 and self.beta >= 0 and self.vs_weight >= 0):
            raise PassError("anp: eps and step_size must be > 0, beta and vs_weight >= 0")

    @property
    def uses_masks(self) -> bool:
        return VARIANTS[self.variant][0]

    def train_attack(self) -> PGD | None:
        return PGD(self.eps, self.step_size, self.steps) if VARIANTS[self.variant][1] else None

    def evaluation_attack(self) -> PGD:
        """What the CLI reports robustness with when ``--attack`` is not given: PGD-``eval_steps``."""
        return PGD(self.eps, self.step_size, self.eval_steps)

    def _mask(self, ctx: PassContext, group: Group) -> BetaBernoulli:
        conv = any(ctx.tensor(p.name).dim() > 2 for p in group.params if p.role == "producer")
        return BetaBernoulli(len(group), self.a_init_conv if conv else self.a_init_fc, self.b_init, self.alpha,
                             self.temperature, self.threshold)

    def score(self, ctx: PassContext) -> Decision:
        with seeded(self.seed):  # the pass's own seed; the caller's random stream is put back after
            return self._score(ctx)

    def _score(self, ctx: PassContext) -> Decision:
        loader = ctx.data.get("train_loader")
        if loader is None:
            raise ValueError("anp needs train_loader= to train its masks and weights")
        factory = (lambda g: self._mask(ctx, g)) if self.uses_masks else None
        masked = ctx.insert_masks(factory, placement=self.placement, training=True)
        with torch.no_grad():
            initial = np.concatenate([m.expected().double().cpu().numpy() for m in masked.masks.values()] or [[]])
        report: dict[str, Any] = {"variant": self.variant}
        if (log := self._train(ctx, masked, loader)) is not None:
            report["training"] = [{"epoch": r["epoch"], "loss": r["loss"]} for r in log]
        masked.module.eval()
        if (metrics := trained_metrics(masked, ctx.data)) is not None:
            report["trained_metrics"] = metrics
        finish = KeepFolded(masked)
        masks: dict[int, BetaBernoulli] = masked.masks  # type: ignore[assignment]
        scores: Scores = {g.id: np.full(len(g), np.inf) for g in ctx.groups.prunable}
        if not masks:  # a dense baseline: L1 of the trained filters, each group at mean 1
            state = masked.state()
            for group in self.prunable(ctx):
                scores[group.id] = rescaled_l1(ctx.groups, group, state.__getitem__, 1.0)
            return Decision(scores, report=report, finish=finish)
        with torch.no_grad():
            expected = {gid: m.expected().double().cpu().numpy() for gid, m in masks.items()}
        for gid, e in expected.items():
            scores[gid] = np.where(e > self.threshold, e, -np.inf)
        every = np.concatenate(list(expected.values()))
        report.update({"masked_groups": len(masks), "skipped": masked.skipped,
                       "pruned_by_threshold": int((every <= self.threshold).sum()), "channels": len(every),
                       "mean_keep_probability": float(every.mean()),
                       "histograms": {"keep_probability": {"before": initial.tolist(), "after": every.tolist(),
                                                           "threshold": self.threshold, "xlabel": "E[pi]"}}})
        return Decision(scores, masks={gid: np.where(e > self.threshold, e, 0.0) for gid, e in expected.items()},
                        report=report, finish=finish)

    def _train(self, ctx: PassContext, masked: Any, loader: Iterable[Any]) -> list[dict[str, Any]] | None:
        """Adversarial training of the masks and weights; the engine's log (None with ``epochs=0``)."""
        if self.epochs == 0:
            return None
        use_masks, adversarial, suppress = VARIANTS[self.variant]
        loss_fn = ctx.data.get("loss") or F.cross_entropy
        model = Adversarial(masked.module, self.train_attack(), loss_fn, suppress)
        mask_params = masked.mask_parameters()
        weights = masked.weight_parameters()
        decayed = [w for w in weights if w.dim() > 1]
        n = max(_dataset_size(loader), self.kl_n_min)
        masks = list(masked.masks.values())
        budget = use_masks and self.schedule == "budget" and ctx.select is not None
        start = round(0.2 * self.epochs)
        end = max(start + 1, round(0.6 * self.epochs))
        hook = AnpHook(model, masks, self.beta, n, self.vs_weight if suppress else 0.0, self.l2, decayed,
                       (self.lr_weight, self.lr_mask), decay_from=min(end, self.epochs - 1) if budget else 0)
        hooks: list[Hook] = [hook]
        if use_masks and self.update == "joint":
            hooks.append(JointGrads(mask_params, lambda: self.beta * torch.stack([m.kl() for m in masks]).sum() / n,
                                    loss_fn))
        if budget:
            hooks.append(KeepBudget(masked.masks, ctx.groups, ctx.select, start, end))
        data = Labelled(loader)
        return train_masked(masked, ctx.data, epochs=self.epochs, lr=self.lr_weight, optimizer="adamw", module=model,
                            loader=data, loss=task_loss(loss_fn), weights=weights,
                            masks=mask_params if use_masks else [], mask_lr=self.lr_mask, mask_optimizer="adamw",
                            mask_loader=Labelled(loader) if self.update == "alternate" else None, hooks=hooks,
                            weight_decay=0.0, schedule="none")


@dataclass(frozen=True)
class KeepFolded:
    """Anp's finish: the trained network with the masks' evaluation values folded in, 0 on every removed
    channel (the dense baseline, without masks: its trained weights)."""

    masked: MaskedModel

    def __call__(self, removed: np.ndarray) -> Finish:
        if not self.masked.masks:
            return Finish(self.masked.state())
        values = {}
        for gid, mask in self.masked.masks.items():
            with torch.no_grad():
                v = mask.keep().double().cpu().numpy()
            v[removed[self.masked.groups[gid].channels]] = 0.0
            values[gid] = v
        return Finish(self.masked.fold(values).weights)
