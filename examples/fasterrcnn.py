"""torchvision's Faster R-CNN with a MobileNetV3-Large FPN backbone as a model file, trained from scratch on the
synthetic shapes (``examples/shapes.py``'s ``CLUTTERED`` task: squares, discs and triangles on striped backgrounds,
boxes known), with mAP@0.5 and mAP@0.5:0.95 by torchmetrics (``pip install torchmetrics pycocotools``). Nothing is
downloaded.

The detector is torchvision's own classes (``FasterRCNN``, ``mobilenet_backbone``, its RPN and RoI heads), sized for
128-pixel images on a CPU: anchors of 16-192 pixels (the builder's fixed 32-512 do not fit such images), FPN levels
at strides 8-32, RoIAlign to 5x5 and a 256-wide box head (the default 7x7 and 1024 cost 3-4x the time per step),
BatchNorm that trains (the builder freezes it, as for pretrained weights). ``model()`` trains it for one pass over
2,560 images (320 steps of 8, AdamW with warm-up and cosine decay; 3-5 minutes on two cores).

In training mode, given its targets, torchvision's detectors return a dict of losses (RPN objectness and box, RoI
classifier and box); fxprune sums them and logs each, so the file has no ``loss()``. torch.export cannot trace the
model whole (NMS keeps a data-dependent number of boxes), so fxprune prunes it by resizing its modules in a copy:

    fxprune run examples/fasterrcnn.py --pass slimming --ratio 0.5 --opt epochs=2

(slimming's default of 20 sparsity epochs is 6,400 steps here, over an hour on two cores: two passes over the
images is the short schedule). ``FRCNN_IMAGES`` shortens the training (tests), ``FRCNN_EPOCHS`` lengthens it.
Plain PyTorch and torchvision; fxprune is not imported here.
"""
from __future__ import annotations

import functools
import math
import os

import shapes
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

SIZE = 128
IMAGES = int(os.environ.get("FRCNN_IMAGES", "2560"))
EPOCHS = int(os.environ.get("FRCNN_EPOCHS", "1"))  # passes over the images in model()
BATCH = 8
LR, WARMUP = 2e-3, 50


def build(classes: int = len(shapes.CLASSES) + 1) -> FasterRCNN:
    """The detector with random weights; ``classes`` counts the background (torchvision's convention)."""
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  norm_layer=nn.BatchNorm2d, trainable_layers=6, returned_layers=[2, 3, 4])
    anchors = AnchorGenerator(((16, 24), (32, 48), (64, 96), (128, 192)), ((1.0,),) * 4)  # squares, as the shapes
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=5, sampling_ratio=1),
        box_head=TwoMLPHead(256 * 5 * 5, 256), box_predictor=FastRCNNPredictor(256, classes),
        min_size=SIZE, max_size=SIZE, image_mean=[0.5] * 3, image_std=[0.25] * 3,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=64)


@functools.cache
def _data() -> tuple[shapes.Batches, shapes.Batches]:
    train = shapes.dataset(IMAGES, SIZE, seed=0, task=shapes.CLUTTERED)
    val = shapes.dataset(256 if IMAGES >= 1024 else 64, SIZE, seed=1, task=shapes.CLUTTERED)
    return shapes.Batches(*train, BATCH, shuffle=True), shapes.Batches(*val, 32, shuffle=False)


def train_loader() -> shapes.Batches:
    """(images (b, 3, SIZE, SIZE), targets) batches; the model computes its own losses from them."""
    return _data()[0]


def val_loader() -> shapes.Batches:
    return _data()[1]


def evaluate(model: nn.Module) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 (%) on the validation images (the RoI heads' own score threshold, 0.05)."""
    return shapes.mean_ap(model, val_loader())


def _lr(step: int, total: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to zero."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(total - WARMUP, 1)))


def model() -> FasterRCNN:
    """The detector trained EPOCHS passes over the images (one by default; deterministic), in eval mode."""
    torch.manual_seed(0)
    net = build()
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}])
    total = EPOCHS * len(train_loader())
    net.train()
    batches = (batch for _ in range(EPOCHS) for batch in train_loader())
    for step, (images, targets) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, total)
        optimizer.zero_grad()
        sum(net(images, targets).values()).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
    return net.eval()


train_epochs = EPOCHS


def example_inputs() -> tuple[torch.Tensor]:
    return (val_loader().images[:2],)
