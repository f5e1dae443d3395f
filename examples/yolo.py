"""A YOLO-style detector as a model file, with data: C2f blocks (split / bottlenecks / concat), an SPPF, a PAN-style
neck, an anchor-free decoupled head, and decoding with a score threshold and NMS, so the number of detections depends
on the image. ``model()`` trains it on a synthetic detection set (``examples/shapes.py``'s ``PLAIN`` task: squares,
discs and triangles, a third to half the image's side, on plain colour noise, boxes known); ``evaluate()`` reports
mAP@0.5 and mAP@0.5:0.95 by torchmetrics (``pip install torchmetrics pycocotools``). Nothing is downloaded.

In training mode, given its targets, the model returns its own losses (``forward(images, targets)``, as
torchvision's detectors do): a focal class loss and a GIoU box loss on the cells whose centre lies near a box's
centre (FCOS-style centre sampling). So the file defines no ``loss()``.

torch.export cannot trace it as a whole (the NMS and the threshold make data-dependent shapes), so fxprune
analyses the record of one real run and prunes by resizing these modules in a copy; slimming trains its
sparsity on that copy:

    fxprune run examples/yolo.py --pass slimming --ratio 0.5

The task leaves this network spare channels, as real detectors trained on a few classes have: the same network
built narrower and trained in full loses mAP@0.5 where pruning to the same MACs need not (the benchmark's capacity
rows: docs/benchmarks/detection.md). On the ``CLUTTERED`` task every width is at its capacity.

``YOLO_EPOCHS`` and ``YOLO_IMAGES`` shorten the training (tests); ``YOLO_WIDTH`` (8) sets the width (the
benchmark's capacity rows). Plain PyTorch and torchvision; fxprune is not imported here.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import shapes
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CLASSES = len(shapes.CLASSES)  # labels 1..3 (0: background, as torchvision counts)
SIZE = 64
WIDTH = int(os.environ.get("YOLO_WIDTH", "8"))  # the stem's channels; every stage doubles it up to 8x
TRAIN_EPOCHS = int(os.environ.get("YOLO_EPOCHS", "10"))
IMAGES = int(os.environ.get("YOLO_IMAGES", "4096"))
TASK = shapes.PLAIN
BATCH = 32


class Conv(nn.Module):
    """Conv2d + BatchNorm + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 to 2c channels, split in two, n bottlenecks on the second half, every intermediate concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c), Conv(4 * c, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1))


class Head(nn.Module):
    """Decoupled, anchor-free: per level a box branch (4 distances) and a class branch."""

    def __init__(self, channels: tuple[int, ...], classes: int, hidden: int) -> None:
        super().__init__()
        self.box = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, 4, 1))
                                 for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3),
                                               nn.Conv2d(hidden, classes, 1)) for c in channels)


class YOLO(nn.Module):
    def __init__(self, classes: int = CLASSES, w: int = WIDTH, conf: float = 0.25, iou: float = 0.6,
                 max_det: int = 100) -> None:
        super().__init__()
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.stem = nn.Sequential(Conv(3, w, 3, 2), Conv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, 1))
        self.p3 = nn.Sequential(Conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))
        self.p4 = nn.Sequential(Conv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2))
        self.p5 = nn.Sequential(Conv(8 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 1), SPPF(8 * w, 8 * w))
        self.up4 = C2f(16 * w, 8 * w, 1, shortcut=False)
        self.up3 = C2f(12 * w, 4 * w, 1, shortcut=False)
        self.down4 = nn.Sequential(Conv(4 * w, 4 * w, 3, 2))
        self.n4 = C2f(12 * w, 8 * w, 1, shortcut=False)
        self.head = Head((4 * w, 8 * w), classes, 2 * w)
        self.strides = (8, 16)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        u4 = self.up4(torch.cat([F.interpolate(p5, scale_factor=2.0), p4], 1))
        n3 = self.up3(torch.cat([F.interpolate(u4, scale_factor=2.0), p3], 1))
        n4 = self.n4(torch.cat([self.down4(n3), u4], 1))
        return [n3, n4]

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every cell of every level: its centre (n, 2) and stride (n,), its box (b, n, 4: x1 y1 x2 y2) and its
        class logits (b, n, classes)."""
        centres, strides, boxes, logits = [], [], [], []
        for i, f in enumerate(self.features(x)):
            _, _, h, w = f.shape
            stride = self.strides[i]
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            centre = (torch.stack([xs, ys], -1).reshape(-1, 2).to(f.dtype) + 0.5) * stride
            dist = F.softplus(self.head.box[i](f)).flatten(2).transpose(1, 2) * stride  # (b, hw, 4) ltrb
            centres.append(centre)
            strides.append(torch.full((h * w,), float(stride), device=x.device))
            boxes.append(torch.cat([centre - dist[..., :2], centre + dist[..., 2:]], -1))
            logits.append(self.head.cls[i](f).flatten(2).transpose(1, 2))
        return torch.cat(centres), torch.cat(strides), torch.cat(boxes, 1), torch.cat(logits, 1)

    def forward(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Detections per image (a dict of boxes, scores and labels); given ``targets`` (training), the losses."""
        centres, strides, boxes, logits = self.dense(x)
        if targets is not None:
            return detection_loss(centres, strides, boxes, logits, targets)
        out = []
        for bx, sc in zip(boxes, logits.sigmoid()):  # per image: a data-dependent number of detections
            conf, label = sc.max(-1)
            keep = conf > self.conf
            bx, conf, label = bx[keep], conf[keep], label[keep]
            kept = torchvision.ops.batched_nms(bx, conf, label, self.iou)[: self.max_det]
            out.append({"boxes": bx[kept], "scores": conf[kept], "labels": label[kept] + 1})
        return out


def detection_loss(centres: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor, logits: torch.Tensor,
                   targets: list[dict[str, torch.Tensor]], radius: float = 2.5) -> dict[str, torch.Tensor]:
    """Focal loss on every cell's classes, GIoU loss on the positive cells' boxes. A cell is positive for a box
    when its centre lies inside the box and within ``radius`` strides of the box's centre; of several such
    boxes, the smallest."""
    cls_target = torch.zeros_like(logits)
    pred, matched = [], []
    for j, t in enumerate(targets):
        gt, labels = t["boxes"].to(boxes.dtype), t["labels"]
        if not len(gt):
            continue
        c = centres[:, None, :]  # (n, 1, 2)
        inside = (c > gt[None, :, :2]).all(-1) & (c < gt[None, :, 2:]).all(-1)
        near = ((c - (gt[None, :, :2] + gt[None, :, 2:]) / 2).abs() <= radius * strides[:, None, None]).all(-1)
        area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].expand(len(centres), -1)
        area = torch.where(inside & near, area, torch.full_like(area, float("inf")))
        best, which = area.min(1)
        pos = torch.isfinite(best)
        cls_target[j, pos, labels[which[pos]] - 1] = 1.0
        pred.append(boxes[j, pos])
        matched.append(gt[which[pos]])
    positives = max(1, sum(len(p) for p in pred))
    cls = torchvision.ops.sigmoid_focal_loss(logits, cls_target, reduction="sum") / positives
    pred_boxes, gt_boxes = torch.cat(pred), torch.cat(matched)
    box = (torchvision.ops.generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / positives
           if len(pred_boxes) else boxes.sum() * 0)
    return {"loss_cls": cls, "loss_box": box}


@functools.cache
def _data() -> tuple[shapes.Batches, shapes.Batches]:
    train = shapes.dataset(IMAGES, SIZE, seed=0, task=TASK)
    val = shapes.dataset(256 if IMAGES >= 1024 else 64, SIZE, seed=1, task=TASK)
    return shapes.Batches(*train, BATCH, shuffle=True), shapes.Batches(*val, BATCH, shuffle=False)


def train_loader() -> shapes.Batches:
    """(images (b, 3, SIZE, SIZE), targets) batches; the model computes its own loss from them."""
    return _data()[0]


def val_loader() -> shapes.Batches:
    return _data()[1]


def evaluate(model: nn.Module) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 (%) on the validation images, detections above a score of 0.05."""
    conf = model.conf
    model.conf = 0.05
    try:
        return shapes.mean_ap(model, val_loader())
    finally:
        model.conf = conf


def model() -> YOLO:
    """The detector trained TRAIN_EPOCHS epochs on the shapes (deterministic), in eval mode."""
    torch.manual_seed(0)
    net = YOLO()
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=1e-4)
    steps = TRAIN_EPOCHS * len(train_loader())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=max(steps, 1))
    net.train()
    for _ in range(TRAIN_EPOCHS):
        for images, targets in train_loader():
            optimizer.zero_grad()
            sum(net(images, targets).values()).backward()
            optimizer.step()
            schedule.step()
    return net.eval()


train_epochs = TRAIN_EPOCHS


def example_inputs() -> tuple[torch.Tensor]:
    return (val_loader().images[:2],)
