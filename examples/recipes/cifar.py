"""Paper recipes on CIFAR-10: the networks the papers prune, CIFAR-10 through torchvision's downloader, the
baseline trained as the papers train theirs. For users with the data (or a network) and a GPU; the commands and
the papers' numbers are in docs/recipes.md:

    RECIPE_ARCH=vgg16 fxprune run examples/recipes/cifar.py --pass l1 --target-macs 0.66 --epochs 40 --lr 0.001

- ``RECIPE_ARCH``: ``vgg16`` or ``vgg19`` (the CIFAR VGGs of Network Slimming and ANP: 3x3 convolutions with
  BatchNorm, a 2x2 average pool and one linear layer) or ``resnet56`` (He et al.'s CIFAR ResNet: three stages of
  nine basic blocks, 16/32/64 channels; the stage changes use a 1x1 convolution shortcut, option B, where the
  original pads with zeros);
- ``RECIPE_DATA``: where CIFAR-10 is, or is downloaded to (default ``~/.cache/fxprune/cifar10``);
- ``RECIPE_CHECKPOINT``: a trained baseline (safetensors): ``model()`` loads it when it exists, else trains the
  baseline and writes it there;
- ``RECIPE_EPOCHS``: the baseline's epochs (160: SGD 0.1, momentum 0.9, weight decay 1e-4, x0.1 at 50% and 75%,
  batch 64, random crops and flips, as Network Slimming and Li et al. train theirs);
- ``RECIPE_SYNTHETIC=1``: random tensors of CIFAR-10's shapes (``RECIPE_SYNTHETIC_SIZE`` images, default 32)
  instead of the data: nothing is downloaded; ``RECIPE_WIDTH_DIV`` divides every width of the network (the same
  layers, thinner). The test suite runs every recipe so, at a width divisor of 8.

Plain PyTorch and torchvision: fxprune is not imported here.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import baseline  # noqa: E402

BATCH = 64
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
VGG = {"vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
       "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]}


def arch() -> str:
    return os.environ.get("RECIPE_ARCH", "vgg16")


def synthetic() -> bool:
    return os.environ.get("RECIPE_SYNTHETIC", "0") == "1"


class CifarVGG(nn.Module):
    def __init__(self, cfg: list, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.avg_pool2d(self.features(x), 2).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [_width(16), _width(32), _width(64)]
        self.conv, self.bn = nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2)):
            stages.append(nn.Sequential(*[BasicBlock(c if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(n)]))
            c = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.layer3(self.layer2(self.layer1(x))).mean((2, 3)))


def _width(c: int) -> int:
    return max(c // int(os.environ.get("RECIPE_WIDTH_DIV", "1")), 4)


def build() -> nn.Module:
    if arch() in VGG:
        return CifarVGG([v if v == "M" else _width(v) for v in VGG[arch()]])
    if arch() == "resnet56":
        return CifarResNet(56)
    raise ValueError(f"RECIPE_ARCH must be vgg16, vgg19 or resnet56, got {arch()!r}")


@functools.cache
def _dataset(train: bool) -> Dataset:
    if synthetic():
        n = int(os.environ.get("RECIPE_SYNTHETIC_SIZE", "32"))
        g = torch.Generator().manual_seed(int(train))
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    root = Path(os.environ.get("RECIPE_DATA", Path.home() / ".cache" / "fxprune" / "cifar10"))
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return CIFAR10(str(root), train=train, download=True,
                   transform=T.Compose([*augment, T.ToTensor(), T.Normalize(MEAN, STD)]))


def train_loader() -> DataLoader:
    return DataLoader(_dataset(True), batch_size=BATCH, shuffle=True, num_workers=0 if synthetic() else 4,
                      generator=torch.Generator().manual_seed(0))


def val_loader() -> DataLoader:
    return DataLoader(_dataset(False), batch_size=256, num_workers=0 if synthetic() else 4)


def _train(net: nn.Module, epochs: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.5 * epochs), int(0.75 * epochs)], 0.1)
    for _ in range(epochs):
        for x, y in train_loader():
            opt.zero_grad()
            F.cross_entropy(net(x.to(device)), y.to(device)).backward()
            opt.step()
        sched.step()
    net.cpu().eval()


def model() -> nn.Module:
    torch.manual_seed(0)
    return baseline(build(), lambda net: _train(net, int(os.environ.get("RECIPE_EPOCHS", "160"))))


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32),)


def evaluate(net: nn.Module) -> dict[str, float]:
    was = net.training
    net.eval()
    device = next(iter(net.parameters())).device
    right = total = 0
    with torch.no_grad():
        for x, y in val_loader():
            right += int((net(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    net.train(was)
    return {"accuracy": right / max(total, 1)}
