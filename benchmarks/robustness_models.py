"""The model file of ``benchmarks/methods_robustness.py``: four architectures of different kinds, trained on
scikit-learn's digits inside the benchmark, none of them the bundled example.

- ``plain``: a plain BatchNorm CNN (four 3x3 convolutions, a max pool, global pooling, a linear head), 8x8;
- ``residual``: a residual CNN (two stages of two basic blocks, the second stage downsampling), 8x8;
- ``inverted``: an inverted-residual network with depthwise convolutions and squeeze-excite (MobileNetV2-style
  blocks), on the digits upsampled to 16x16;
- ``vit``: a small vision transformer (4 layers, 4 heads, a class token, LayerNorm), 4x4 patches of the digits
  upsampled to 16x16.

Which one, and the seed: the environment's ``FXPRUNE_BENCH_ARCH`` and ``FXPRUNE_BENCH_SEED``. ``model()``
trains the network once per architecture and seed and keeps its weights in ``FXPRUNE_BENCH_CACHE`` (safetensors),
so every pass of a seed starts from the same trained model. Plain PyTorch: fxprune is not imported here.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 64
EPOCHS = {"plain": 12, "residual": 12, "inverted": 15, "vit": 40}
SIZE = {"plain": 8, "residual": 8, "inverted": 16, "vit": 16}


def arch() -> str:
    return os.environ.get("FXPRUNE_BENCH_ARCH", "plain")


def seed() -> int:
    return int(os.environ.get("FXPRUNE_BENCH_SEED", "0"))


@functools.cache
def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): the bundled example's split (stratified 80/20, standardised), at
    ``size`` x ``size`` (bilinear upsampling)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    i_train, i_val = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=digits.target)
    mean, std = x[i_train].mean(), x[i_train].std()
    return (x[i_train] - mean) / std, y[i_train], (x[i_val] - mean) / std, y[i_val]


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 32), conv_bn(32, 32), nn.MaxPool2d(2), conv_bn(32, 64),
                                      conv_bn(64, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c_in, c_out, stride=stride), conv_bn(c_out, c_out, act=False)
        self.down = conv_bn(c_in, c_out, 1, stride, act=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return F.relu(skip + self.conv2(self.conv1(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.layer1 = nn.Sequential(Basic(32, 32), Basic(32, 32))
        self.layer2 = nn.Sequential(Basic(32, 64, 2), Basic(64, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduce: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(c // reduce, 4), 1), nn.Conv2d(max(c // reduce, 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden)
        self.project = conv_bn(hidden, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class Inverted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24),
                                    InvertedResidual(24, 32, 2), InvertedResidual(32, 32))
        self.head = conv_bn(32, 128, 1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 4, mlp: int = 128, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (16 // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[Layer(dim, heads, mlp) for _ in range(layers)])
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.fc(self.norm(self.layers(t))[:, 0])


ARCHS = {"plain": Plain, "residual": Residual, "inverted": Inverted, "vit": ViT}


def _train(net: nn.Module) -> None:
    x, y, _, _ = _digits(SIZE[arch()])
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed()))
    epochs = EPOCHS[arch()]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * len(loader))
    net.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
            sched.step()
    net.eval()


def model() -> nn.Module:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed())
    net = ARCHS[arch()]()
    cache = Path(os.environ.get("FXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "fxprune-bench"))
    path = cache / f"{arch()}-{seed()}.safetensors"
    if path.exists():
        net.load_state_dict(load_file(path))
    else:
        _train(net)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
        tmp.replace(path)
    return net.eval()


def train_epochs() -> int:
    """How long model() trains: the length Scratch-E retrains for, and Scratch-B x the MACs removed."""
    return EPOCHS[arch()]


def example_inputs() -> tuple[torch.Tensor]:
    return (_digits(SIZE[arch()])[2][:2],)


def train_loader() -> DataLoader:
    x, y, _, _ = _digits(SIZE[arch()])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed()))


def val_loader() -> DataLoader:
    _, _, x, y = _digits(SIZE[arch()])
    return DataLoader(TensorDataset(x, y), batch_size=256)


def evaluate(net: nn.Module) -> dict[str, float]:
    net.eval()
    device = next(iter(net.parameters())).device
    _, _, x, y = _digits(SIZE[arch()])
    with torch.no_grad():
        return {"accuracy": float((net(x.to(device)).argmax(1).cpu() == y).float().mean())}
