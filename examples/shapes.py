"""A synthetic detection set for the detector examples: shapes of three classes (square, disc, triangle) in random
colours on textured backgrounds, with their boxes known exactly. Generated from a seed, so nothing is downloaded and
every run sees the same images. Two tasks (``Task``): ``CLUTTERED`` (small to large objects, up to three, on striped
backgrounds) and ``PLAIN`` (larger objects, up to two, on plain colour noise). Also the examples' metric: mAP@0.5 and
mAP@0.5:0.95 by torchmetrics' ``MeanAveragePrecision`` (``pip install torchmetrics pycocotools``).

Plain PyTorch; fxprune is not imported here. The detector examples import it as a neighbour.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CLASSES = ("square", "disc", "triangle")
Target = dict[str, torch.Tensor]  # {"boxes": (n, 4) x1 y1 x2 y2 in pixels, "labels": (n,) int64, 1 to 3}


@dataclass(frozen=True)
class Task:
    """What the images hold: objects' sides from ``size // min_div`` to ``size // 2``, 1 to ``max_objects`` of
    them, on low-frequency colour noise of amplitude ``noise`` plus stripes of amplitude ``stripes``."""

    min_div: int
    max_objects: int
    noise: float
    stripes: float


CLUTTERED = Task(min_div=8, max_objects=3, noise=0.6, stripes=0.1)
PLAIN = Task(min_div=3, max_objects=2, noise=0.3, stripes=0.0)


@functools.cache
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs): each pixel's row and column, (size, size) each."""
    return torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")


def _background(size: int, g: torch.Generator, task: Task) -> torch.Tensor:
    """Low-frequency colour noise plus faint stripes at a random angle: a texture the detector must ignore (mean
    brightness 0.5 whatever the amplitudes)."""
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    img = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    ys, xs = _grid(size)
    angle = float(torch.rand((), generator=g)) * math.pi
    period = 4 + 8 * float(torch.rand((), generator=g))
    stripes = torch.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
    return (task.noise * img + task.stripes * stripes + 0.5 - task.noise / 2).clamp(0, 1)


def _shape_mask(kind: int, x0: int, y0: int, side: int, size: int) -> torch.Tensor:
    ys, xs = _grid(size)
    u, v = (xs - x0 + 0.5) / side, (ys - y0 + 0.5) / side  # 0..1 inside the box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == 0:
        return inside
    if kind == 1:
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return inside & (v >= 1 - 2 * torch.minimum(u, 1 - u) * 1.0)  # apex at the top centre, base at the bottom


def image(size: int, g: torch.Generator, task: Task) -> tuple[torch.Tensor, Target]:
    """One image (3, size, size) in [0, 1] and its target: 1 to ``task.max_objects`` shapes, overlapping little."""
    img = _background(size, g, task)
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, task.max_objects + 1, (), generator=g))):
        for _attempt in range(10):
            side = int(torch.randint(size // task.min_div, size // 2, (), generator=g))
            x0, y0 = (int(torch.randint(0, size - side, (), generator=g)) for _ in range(2))
            box = torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float32)
            if not boxes or _iou(box, torch.stack(boxes)).max() < 0.2:
                break
        else:
            continue
        kind = int(torch.randint(0, len(CLASSES), (), generator=g))
        colour = torch.rand(3, 1, 1, generator=g)
        mask = _shape_mask(kind, x0, y0, side, size)
        img = torch.where(mask, colour.expand(3, size, size), img)
        boxes.append(box)
        labels.append(kind + 1)  # 0 is the background, as torchvision's detectors count
    return img, {"boxes": torch.stack(boxes), "labels": torch.tensor(labels, dtype=torch.int64)}


def _iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(box[None], others)[0]


def dataset(n: int, size: int, seed: int, task: Task) -> tuple[torch.Tensor, list[Target]]:
    """``n`` images (n, 3, size, size) of ``task`` and their targets, the same for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    pairs = [image(size, g, task) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


class Batches:
    """(images (b, 3, H, W), targets: a list of b dicts) batches, reshuffled per pass from a seed (the same
    order on every run)."""

    def __init__(self, images: torch.Tensor, targets: list[Target], batch: int, shuffle: bool, seed: int = 0) -> None:
        self.images, self.targets, self.batch, self.shuffle, self.seed = images, targets, batch, shuffle, seed
        self.passes = 0

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[Target]]]:
        order = torch.arange(len(self.images))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + self.passes))
            self.passes += 1
        for i in range(0, len(order), self.batch):
            idx = order[i:i + self.batch]
            yield self.images[idx], [self.targets[j] for j in idx.tolist()]


def mean_ap(model: nn.Module, batches: Any, **predict: Any) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 (in %) of ``model``'s detections on ``batches``; the model stays on its device and
    in the mode it had. ``model(images, **predict)`` returns one dict of boxes, scores and labels per image."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for images, targets in batches:
            out = model(images.to(device), **predict)
            metric.update([{k: v.cpu() for k, v in o.items()} for o in out], targets)
    model.train(was)
    result = metric.compute()
    return {"map_50": 100 * float(result["map_50"]), "map": 100 * float(result["map"])}
