"""fxprune's bundled example: a small residual CNN on scikit-learn's handwritten digits.

The data ships with scikit-learn (1797 images, 8x8, ten classes), so nothing is downloaded.
``model()`` trains the network for a few seconds, so fxprune starts from a trained model:

    fxprune run examples/digits.py --pass l1 --ratio 0.5 --finetune-epochs 3

This file follows the model-file convention (see the README): model(), example_inputs(), and the
optional train_loader(), val_loader(), loss() and evaluate(). It is plain PyTorch: fxprune is not
imported here.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 0
SIZE = 8
BATCH = 64
# Enough for about 98% validation accuracy in a few seconds on two CPU cores; DIGITS_EPOCHS overrides it.
PRETRAIN_EPOCHS = int(os.environ.get("DIGITS_EPOCHS", "6"))


@functools.cache
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): a fixed, stratified 80/20 split, standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    i_train, i_val = train_test_split(range(len(y)), test_size=0.2, random_state=SEED, stratify=digits.target)
    x_train, x_val = x[i_train], x[i_val]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[i_train], (x_val - mean) / std, y[i_val]


class DigitsNet(nn.Module):
    """stem -> residual block -> conv -> pool -> conv -> flatten -> linear (about 3M MACs per image)."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width * (SIZE // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # residual: couples stem and conv2
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(self.dropout(x.flatten(1)))  # flatten couples conv4's channels with fc's inputs


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(SEED)  # the same batches on every run
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle, generator=generator)


def train_loader() -> DataLoader:
    x, y, _, _ = _data()
    return _loader(x, y, shuffle=True)


def val_loader() -> DataLoader:
    _, _, x, y = _data()
    return _loader(x, y, shuffle=False)


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def evaluate(model: nn.Module) -> dict[str, float]:
    """Validation accuracy (the model stays on its device; batches go to it)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader():
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
    model.train(was_training)
    return {"accuracy": correct / total}


def example_inputs() -> tuple[torch.Tensor]:
    # A batch of 8 (not 1): torch.export specialises a batch size of 1, and the pruned model should
    # accept any batch size.
    return (_data()[2][:8],)


def model() -> nn.Module:
    """A DigitsNet trained for PRETRAIN_EPOCHS epochs (deterministic), in eval mode."""
    torch.manual_seed(SEED)
    net = DigitsNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    net.train()
    for _ in range(PRETRAIN_EPOCHS):
        for x, y in train_loader():
            optimizer.zero_grad()
            loss(net(x), y).backward()
            optimizer.step()
    return net.eval()


if __name__ == "__main__":  # `python examples/digits.py`: train and print the accuracy of the unpruned model
    print(evaluate(model()))
