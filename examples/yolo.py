"""A YOLO-style detector as a model file: C2f blocks (split / bottlenecks / concat), an SPPF, a PAN-style
neck, an anchor-free decoupled head, and decoding with a score threshold and NMS, so the number of
detections depends on the image. Random weights (nothing is downloaded).

torch.export cannot trace it as a whole (the NMS and the threshold make data-dependent shapes), so fxprune
analyses the record of one real run and prunes by resizing these modules in a copy:

    fxprune run examples/yolo.py --pass l1 --ratio 0.5

Plain PyTorch and torchvision; fxprune is not imported here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CLASSES = 8
SIZE = 128


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

    def __init__(self, channels: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.box = nn.ModuleList(nn.Sequential(Conv(c, 32, 3), Conv(32, 32, 3), nn.Conv2d(32, 4, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, 32, 3), Conv(32, 32, 3), nn.Conv2d(32, classes, 1))
                                 for c in channels)


class YOLO(nn.Module):
    def __init__(self, classes: int = CLASSES, conf: float = 0.25, iou: float = 0.6, max_det: int = 100) -> None:
        super().__init__()
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.stem = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1))
        self.p3 = nn.Sequential(Conv(32, 64, 3, 2), C2f(64, 64, 2))
        self.p4 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128, 2))
        self.p5 = nn.Sequential(Conv(128, 128, 3, 2), C2f(128, 128, 1), SPPF(128, 128))
        self.up4 = C2f(128 + 128, 128, 1, shortcut=False)
        self.up3 = C2f(128 + 64, 64, 1, shortcut=False)
        self.down4 = nn.Sequential(Conv(64, 64, 3, 2))
        self.n4 = C2f(64 + 128, 128, 1, shortcut=False)
        self.head = Head((64, 128), classes)
        self.strides = (8, 16)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        u4 = self.up4(torch.cat([F.interpolate(p5, scale_factor=2.0), p4], 1))
        n3 = self.up3(torch.cat([F.interpolate(u4, scale_factor=2.0), p3], 1))
        n4 = self.n4(torch.cat([self.down4(n3), u4], 1))
        return [n3, n4]

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        boxes, scores = [], []
        for i, f in enumerate(self.features(x)):
            b, _, h, w = f.shape
            stride = self.strides[i]
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            centre = (torch.stack([xs, ys], -1).reshape(-1, 2).to(f.dtype) + 0.5) * stride
            dist = F.softplus(self.head.box[i](f)).flatten(2).transpose(1, 2) * stride  # (b, hw, 4) ltrb
            boxes.append(torch.cat([centre - dist[..., :2], centre + dist[..., 2:]], -1))
            scores.append(self.head.cls[i](f).sigmoid().flatten(2).transpose(1, 2))
        boxes, scores = torch.cat(boxes, 1), torch.cat(scores, 1)
        out = []
        for bx, sc in zip(boxes, scores):  # per image: a data-dependent number of detections
            conf, label = sc.max(-1)
            keep = conf > self.conf
            bx, conf, label = bx[keep], conf[keep], label[keep]
            kept = torchvision.ops.batched_nms(bx, conf, label, self.iou)[: self.max_det]
            out.append({"boxes": bx[kept], "scores": conf[kept], "labels": label[kept]})
        return out


def model() -> YOLO:
    torch.manual_seed(0)
    net = YOLO()
    with torch.no_grad():  # random BatchNorm statistics, and class biases that let some boxes through
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for seq in net.head.cls:
            seq[-1].bias.fill_(-0.5)
    return net.eval()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),)
