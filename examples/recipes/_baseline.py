"""What the recipes' model files share: the baseline, loaded from ``RECIPE_CHECKPOINT`` (safetensors) when it
exists, else trained and written there."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn


def baseline(net: nn.Module, train: Callable[[nn.Module], None]) -> nn.Module:
    """``net`` with the checkpoint's weights, or trained by ``train(net)`` (and saved when a path is given)."""
    from safetensors.torch import load_file, save_file

    checkpoint = os.environ.get("RECIPE_CHECKPOINT")
    if checkpoint and Path(checkpoint).exists():
        net.load_state_dict(load_file(checkpoint))
        return net.eval()
    train(net)
    if checkpoint:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, checkpoint)
    return net.eval()
