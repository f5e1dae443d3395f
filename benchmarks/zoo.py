"""Model-zoo benchmark: fxprune (l1, ratio 0.5) side by side with Torch-Pruning on the same models.

Run from the repository root (fxprune installed or importable from the checkout)::

    python benchmarks/zoo.py --suite torchvision --out benchmarks/results/zoo_torchvision.json
    python benchmarks/zoo.py --suite timm --out benchmarks/results/zoo_timm.json
    python benchmarks/zoo.py --suite hf --out benchmarks/results/zoo_hf.json
    python benchmarks/zoo.py --suite detection --out benchmarks/results/zoo_detection.json
    python benchmarks/zoo.py --suite timm-families --no-tp --out benchmarks/results/zoo_timm_families.json
    python benchmarks/zoo.py --suite torchvision --models resnet18,resnet50 --no-tp
    python benchmarks/zoo.py --markdown --from-json benchmarks/results/zoo_*.json   # tables only, no runs

Every model runs in a fresh subprocess per tool (``--timeout`` seconds each, default 300), so a hang or a
crash costs one row, and memory is measured per model. Results are written to ``--out`` after every model
(``--resume`` skips the models already there). Sweeps take a while: run them in the background.

What is measured (batch 1, random weights, eval mode):

* **weights**: the library's own random initialisation (seed 0), except that constant-initialised tensors
  (zero heads, 1e-6 layer scales, ones in norms) get random values (``perturb_constants``), so that the
  equivalence check below cannot pass vacuously on an all-zero output.
* **MACs**: ``torch.utils.flop_counter.FlopCounterMode`` flops / 2 on one forward, the same way for the
  original, fxprune's compacted GraphModule and Torch-Pruning's pruned module (convolutions, matmuls,
  attention; element-wise ops are not counted). **Params**: ``sum(p.numel() for p in m.parameters())``.
* **max rel err**: the compacted module vs ``fxprune.testing.masked_model`` (the original with the pruned
  positions zeroed), both in float64 on the same input: ``max|got - ref| / max|ref|`` over all outputs.
* **time**: wall time of ``fxprune.prune(model, inputs, "l1", 0.5)`` (trace + analyze + score + compact +
  shape verification); for Torch-Pruning, constructing ``MagnitudePruner`` (L1 magnitude importance,
  ``ignored_layers`` = the classifier / LM head) plus ``step()``. Both are measured *warm*: each worker first
  prunes a tiny model with the same tool, so one-time costs (imports, torch.export / dynamo initialisation)
  are not charged to the model.
* **peak extra memory**: the worker resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- 5)
  just before pruning and reads ``VmHWM`` right after: ``peak RSS during pruning - RSS before pruning``.
  It includes the new (compacted) parameters and everything torch.export allocates; it does not include the
  model itself. Where ``clear_refs`` is not writable the ``ru_maxrss`` delta is used instead (a lower bound
  when an earlier phase had a higher peak). Reported in MiB and as a multiple of the parameter bytes.
* **threads**: each worker runs with ``torch.set_num_threads(1)`` by default (``--threads``); the pruning
  itself is single-threaded Python for both tools.
* **nodes**: nodes of the traced (torch.export) graph, for the time-vs-size linear fit.

The ``timm-families`` suite runs the smallest model (by parameter count, counted on the meta device) of every
model module timm has (``timm.list_modules()``: one per family; the list is cached in
``benchmarks/results/timm_families.json`` per timm version) and sorts each into a verdict: **exact** (compacted ==
masked), **exact, inexact frozen** (exact, and some groups were refused because removal is not zeroing there),
**exact, nothing prunable** (every group frozen, e.g. an RMSNorm or a mean over the channels everywhere),
**exact (float32)** (the float64 check cannot run, e.g. the traced graph casts to float32 where the model's
code follows its input's dtype, and the float32 check is within 1e-5), **refused** (a clear fxprune error:
TraceError, CompactionError, SelectionError), **failed** (anything else:
another exception, a timeout, a crash) or **SILENT INEXACT** (the compacted model differs from the masked one
and nothing said so: the bug this suite exists to catch).

Status: ``ok``; ``inexact`` (max rel err > 1e-6); ``ErrorClass: message`` when a stage raised; ``timeout`` or
``timeout (after prune)`` (the worker, which also builds the model and runs the checks, ran out of time; what
it had measured is kept);
``crash`` when the worker died. Torch-Pruning is ``ok`` only if the pruned model still runs and returns
outputs of the original shapes. A Torch-Pruning run that removed nothing (parameters and MACs unchanged, e.g.
GPT-2, whose ``Conv1D`` layers it does not know) did not do the same job: the summary lists it and leaves it out
of the time comparison.
"""
from __future__ import annotations

import argparse
import copy
import gc
import glob
import json
import os
import resource
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any

from _results import load, save

RESULT_TAG = "ZOO_RESULT "
PARTIAL_TAG = "ZOO_PARTIAL "  # what a worker knows so far: kept when it times out later


def _partial(r: dict[str, Any], stage: str) -> None:
    print(PARTIAL_TAG + json.dumps({**r, "stage_done": stage}, default=str), flush=True)
EXACT_TOL = 1e-6

# ----------------------------------------------------------------------------------------------------
# Model lists
# ----------------------------------------------------------------------------------------------------
TIMM_SAMPLE = [  # one or two per family, all with pretrained=False
    "resnet50d", "resnest14d", "dla34", "regnetx_002", "regnety_002", "densenet121", "efficientnet_b0",
    "tf_efficientnetv2_b0", "mobilenetv3_large_100", "mobilenetv4_conv_small", "ghostnet_100", "rexnet_100",
    "hrnet_w18_small", "repvgg_a0", "mobileone_s0", "convnext_atto", "edgenext_xx_small", "poolformer_s12",
    "mixer_s16_224", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "levit_128s", "coat_lite_tiny", "pvt_v2_b0", "mobilevit_xxs", "efficientformer_l1", "fastvit_t8",
    "tiny_vit_5m_224", "xcit_nano_12_p16_224", "eva02_tiny_patch14_224", "maxvit_nano_rw_256",
]

HF_MODELS = ["bert", "gpt2", "llama", "vit", "distilbert", "qwen2", "mistral"]

# torchvision models that need (or are defined at) 224x224 input
TV_224 = ("vit_", "swin", "maxvit")


FAMILIES_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "timm_families.json")


def timm_families(cache: str = FAMILIES_CACHE) -> dict[str, str]:
    """timm model module -> its smallest model by parameter count (built on the meta device: no memory,
    no weights). Scanning all ~1400 models takes a few minutes, so the answer is cached per timm version."""
    import timm
    import torch
    if os.path.exists(cache):
        with open(cache) as f:
            data = json.load(f)
        if data.get("timm") == timm.__version__:
            return data["families"]
    families: dict[str, str] = {}
    for module in timm.list_modules():
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is not a candidate
                continue
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            families[module] = best[1]
    save_results(cache, {"timm": timm.__version__, "families": families})
    return families


def list_models(suite: str) -> list[str]:
    if suite == "timm-families":
        return sorted(set(timm_families().values()))
    if suite == "torchvision":
        import torchvision
        return list(torchvision.models.list_models(module=torchvision.models))
    if suite == "timm":
        return list(TIMM_SAMPLE)
    if suite == "hf":
        return list(HF_MODELS)
    if suite == "detection":
        import torchvision
        return list(torchvision.models.list_models(module=torchvision.models.detection)) + [FROZEN_BN]
    raise ValueError(suite)


# The detection suite: every torchvision detection, keypoint and instance-segmentation model (random weights,
# 5 classes), plus a Faster R-CNN whose ResNet-50 backbone uses FrozenBatchNorm2d, as pretrained backbones do.
FROZEN_BN = "fasterrcnn_resnet50_fpn_frozenbn"
# Torch-Pruning's recipe for torchvision detectors (its benchmarks/prunability/torchvision_pruning.py): the RPN's
# output convolutions, the FPN and the ROI heads are ignored layers (SSD and the one-stage detectors: the head),
# and the models are built without FrozenBatchNorm, which it does not support.
DETECTION_IGNORED = ("rpn.head.cls_logits", "rpn.head.bbox_pred", "backbone.fpn", "roi_heads", "head")


def _detector(name: str):
    import torchvision
    from torchvision.models import detection
    if name == FROZEN_BN:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops.misc import FrozenBatchNorm2d
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                       trainable_layers=3)
        return detection.FasterRCNN(backbone, num_classes=5)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": 5}
    if name.startswith("keypointrcnn"):
        kwargs.update(num_classes=2, num_keypoints=5)
    return torchvision.models.get_model(name, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Building models and inputs (worker side)
# ----------------------------------------------------------------------------------------------------
def _hf_model(name: str):
    import transformers as T
    small = dict(num_hidden_layers=4, num_attention_heads=8, hidden_size=256, intermediate_size=1024)
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=1000, max_position_embeddings=128, **small)), "tokens"
    if name == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(vocab_size=1000, n_layers=4, n_heads=8, dim=256, hidden_dim=1024,
                                                    max_position_embeddings=128)), "tokens"
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=8,
                                              use_cache=False)), "tokens"
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=1000, max_position_embeddings=128, num_key_value_heads=2,
                                                use_cache=False, **small)), "tokens"
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=1000, max_position_embeddings=128, num_key_value_heads=2,
                                                use_cache=False, **small)), "tokens"
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(vocab_size=1000, max_position_embeddings=128,
                                                    num_key_value_heads=4, use_cache=False, **small)), "tokens"
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=224, patch_size=16, num_labels=1000,
                                                       **small)), "image"
    raise ValueError(f"unknown HF model {name!r}; known: {HF_MODELS}")


def build(suite: str, name: str):
    """(model in eval mode, kind, candidate input sizes)."""
    import torch
    torch.manual_seed(0)
    if suite == "torchvision":
        import torchvision
        kwargs: dict[str, Any] = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(name, **kwargs)
        sizes = [224] if name.startswith(TV_224) else [64, 128, 224, 299]
        return model.eval(), "image", sizes
    if suite in ("timm", "timm-families"):
        import timm
        model = timm.create_model(name, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        native = int(cfg.get("input_size", (3, 224, 224))[-1])
        sizes = [native] if cfg.get("fixed_input_size") else [64, 128, native]
        return model.eval(), "image", sorted(set(sizes), key=sizes.index)
    if suite == "hf":
        model, kind = _hf_model(name)
        return model.eval(), kind, [224] if kind == "image" else [32]
    if suite == "detection":
        return _detector(name).eval(), "detection", [256]
    raise ValueError(suite)


def perturb_constants(model, seed: int = 0) -> int:
    """Give constant-initialised float tensors random values; returns how many were changed.

    Zero-initialised classifier heads (torchvision ViT, timm Mixer/LeViT/PoolFormer...) make every output 0, and
    1e-6 layer scales (ConvNeXt) hide every residual branch below float64 resolution: the equivalence check would
    pass vacuously. Ones-like tensors (norm weights, running_var) get U(0.5, 1.5), the rest N(0, 0.1).
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for _, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            if float(flat[0]) > 0.5:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
            changed += 1
    return changed


def make_inputs(kind: str, size: int):
    import torch
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return (torch.randn(1, 3, size, size, generator=g),)
    if kind == "detection":  # a list of one image in [0, 1], as torchvision's detectors take
        return ([torch.rand(3, size, size, generator=g)],)
    return (torch.randint(0, 1000, (1, size), generator=g),)


def resolve_size(model, kind: str, sizes: list[int]) -> int:
    """The first candidate size the model accepts (a plain forward)."""
    import torch
    err: Exception | None = None
    for s in sizes:
        try:
            with torch.no_grad():
                model(*make_inputs(kind, s))
            return s
        except Exception as exc:  # noqa: BLE001
            err = exc
    raise RuntimeError(f"no input size in {sizes} works: {type(err).__name__}: {err}")


def classifier_layers(model, suite: str) -> list:
    """Layers Torch-Pruning must not prune: those producing the model's outputs (classifier, LM head)."""
    import torch.nn as nn
    out: list = []
    if suite == "detection":
        return [m for n, m in model.named_modules() if n in DETECTION_IGNORED]
    if suite == "hf":
        for attr in ("lm_head", "classifier"):
            m = getattr(model, attr, None)
            if isinstance(m, nn.Module):
                out.append(m)
        return out
    num_classes = 1000
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            out.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes:
            out.append(m)
    if suite.startswith("timm") and hasattr(model, "get_classifier"):
        c = model.get_classifier()
        for m in (c if isinstance(c, (tuple, list)) else [c]):
            if isinstance(m, nn.Module) and all(m is not o for o in out):
                out.append(m)
    return out


def tensor_leaves(x: Any) -> list:
    import torch
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        return [t for v in x.to_tuple() for t in tensor_leaves(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensor_leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensor_leaves(v)]
    return []


def count_macs(model, inputs) -> int:
    """FlopCounterMode's MACs on one forward: fxprune's own counter, the same for both tools."""
    from fxprune.measure import count_macs as flop_counter_macs
    return flop_counter_macs(model, tuple(inputs))


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def param_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------------
# Memory: peak RSS over one phase
# ----------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak resident memory during a ``with`` block minus resident memory at its start, in bytes."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss delta"
        self.rss0 = _status_kb("VmRSS") * 1024
        self.max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method.startswith("VmHWM"):
            self.extra = max(0, _status_kb("VmHWM") * 1024 - self.rss0)
        else:
            self.extra = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.max0)


def _err(exc: BaseException) -> dict[str, str]:
    msg = str(exc).strip()
    first = msg.splitlines()[0] if msg else ""
    return {"status": f"{type(exc).__name__}: {first[:160]}",
            "error": f"{type(exc).__name__}: {msg[:3000]}",
            "traceback": "".join(traceback.format_exception(exc)[-12:])[-4000:]}


def _tiny():
    import torch.nn as nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


# ----------------------------------------------------------------------------------------------------
# Workers (one model, one tool, one fresh process)
# ----------------------------------------------------------------------------------------------------
def _measured(r: dict[str, Any], run: Any) -> Any:
    """Run one tool's pruning call, recording wall time, CPU time and peak extra memory in ``r``
    (the same measurement for both tools); returns what ``run`` returned."""
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        r["time_s"], r["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    r["peak_extra_bytes"] = mem.extra
    r["memory_method"] = mem.method
    _partial(r, "prune")
    return out


def worker_fxprune(suite: str, name: str, size: int | None, ratio: float) -> dict[str, Any]:
    import torch

    import fxprune
    from fxprune.testing import masked_model

    r: dict[str, Any] = {"tool": "fxprune"}
    tiny = _tiny()
    for _ in range(2):  # warm-up: torch.export's one-time costs
        fxprune.prune(tiny, (torch.randn(1, 3, 16, 16),), "l1", 0.5)
    try:
        model, kind, sizes = build(suite, name)
        r["perturbed_tensors"] = perturb_constants(model)
        r["size"] = size = resolve_size(model, kind, [size] + sizes if size else sizes)
        inputs = make_inputs(kind, size)
        r["params_before"] = count_params(model)
        r["param_bytes"] = param_bytes(model)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        r["status"] = "build failed: " + r["status"]
        return r
    try:
        res = _measured(r, lambda: fxprune.prune(model, inputs, "l1", ratio))
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        try:
            r["macs_before"] = count_macs(model, inputs)
        except Exception:  # noqa: BLE001
            pass
        return r
    groups = res.groups
    r["nodes"] = len(groups.gm.graph.nodes)
    r["target"] = getattr(res, "compaction", {}).get("target", "graph")
    r["groups"] = len(groups)
    r["prunable_groups"] = len(groups.prunable)
    r["unsupported"] = {str(k): (v if isinstance(v, (int, str)) else str(v)) for k, v in groups.unsupported.items()}
    frozen: dict[str, int] = {}
    for g in groups:
        if not g.prunable:
            reason = g.frozen or "frozen"
            frozen[reason] = frozen.get(reason, 0) + len(g)
    r["frozen_reasons"] = dict(sorted(frozen.items(), key=lambda kv: -kv[1])[:12])
    r["frozen_channels"] = int(sum(len(g) for g in groups if not g.prunable))
    refused = [g for g in groups if g.inexact is not None and not g.prunable]
    r["inexact_frozen_groups"], r["inexact_frozen_channels"] = len(refused), int(sum(len(g) for g in refused))
    r["inexact_reasons"] = sorted({g.inexact for g in refused})[:6]
    r["prunable_channels"] = int(sum(len(g) for g in groups.prunable))
    r["macs_before"] = count_macs(model, inputs)
    r["params_after"] = count_params(res.module)
    try:
        r["macs_after"] = count_macs(res.module, inputs)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        r["status"] = "compacted module fails: " + r["status"]
        return r
    _partial(r, "macs")
    try:
        r["max_rel_err"] = equivalence_error(model, res, inputs, masked_model)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        r["status"] = "equivalence check failed: " + r["status"]
        if suite == "detection" and "shape differs" in str(exc):  # a different number of detections: scores
            try:  # tied at the top-k / threshold boundary flip on 1e-16 differences; compare what feeds them
                r["max_rel_err_dense"] = err = detection_dense_error(model, res, inputs, masked_model)
                r["status"] = ("ok (dense heads; detections tie-break differently)" if err <= EXACT_TOL
                               else "inexact (dense heads)")
                return r
            except Exception as exc_b:  # noqa: BLE001
                r["dense_error"] = _err(exc_b)["status"]
        try:  # is it only the float64 cast? the same check in float32 says whether the compaction is right
            r["max_rel_err_float32"] = equivalence_error(model, res, inputs, masked_model, dtype=None)
        except Exception as exc32:  # noqa: BLE001
            r["float32_error"] = _err(exc32)["status"]
        return r
    r["status"] = "ok" if r["max_rel_err"] <= EXACT_TOL else "inexact"
    if suite == "detection" and r["status"] == "inexact":  # the same detections, reordered among tied scores?
        r["max_rel_err_dense"] = err = detection_dense_error(model, res, inputs, masked_model)
        if err <= EXACT_TOL:
            r["status"] = "ok (dense heads; detections tie-break differently)"
    return r


def detection_dense_error(model, res, inputs, masked_model) -> float:
    """max |got - ref| / max |ref| over a torchvision detector's dense predictions (the outputs of ``head`` or
    ``rpn.head``: every anchor's scores and box deltas, computed from the pruned backbone and FPN), float64:
    what the final detections are selected from, before score ties reorder them."""
    import torch
    masked = masked_model(model, res.plan, res.groups).eval().double()
    compacted = copy.deepcopy(res.module).eval().double()
    outs: dict[str, list] = {}
    for tag, net in (("ref", masked), ("got", compacted)):
        for name, m in net.named_modules():
            if name in ("head", "rpn.head"):
                m.register_forward_hook(lambda mod, args, out, tag=tag:
                                        outs.setdefault(tag, []).extend(tensor_leaves(out)))
        with torch.no_grad():
            net([x.double() for x in inputs[0]])
    ref, got = outs["ref"], outs["got"]
    if len(ref) != len(got) or not ref:
        raise AssertionError("no dense head outputs to compare")
    num = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    return num / max(float(a.abs().max()) for a in ref)


def equivalence_error(model, res, inputs, masked_model, dtype: Any = "float64") -> float:
    import torch
    dt = getattr(torch, dtype) if dtype else None
    masked = masked_model(model, res.plan, res.groups).eval()
    compacted = copy.deepcopy(res.module).eval()
    if dt is not None:
        masked, compacted = masked.to(dt), compacted.to(dt)
    def cast(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        return x.to(dt) if dt is not None and isinstance(x, torch.Tensor) and x.is_floating_point() else x

    x64 = cast(tuple(inputs))
    with torch.no_grad():
        ref = tensor_leaves(masked(*x64))
        del masked
        got = tensor_leaves(compacted(*x64))
    if len(ref) != len(got):
        raise AssertionError(f"output structure differs: {len(ref)} vs {len(got)} tensors")
    num = den = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            raise AssertionError(f"output shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point():
            num = max(num, float((a != b).any()))
            continue
        num = max(num, float((a - b).abs().max()) if a.numel() else 0.0)
        den = max(den, float(a.abs().max()) if a.numel() else 0.0)
    return num / den if den > 0 else num


def _tp_heads(model, suite: str) -> dict:
    """Torch-Pruning needs the attention layers' head counts to prune HF attention consistently."""
    heads: dict = {}
    if suite != "hf":
        return heads
    cfg = model.config
    nh = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None) or getattr(cfg, "n_head", None)
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    for m in model.modules():
        for q, k, v in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin")):
            if all(hasattr(m, a) for a in (q, k, v)):
                heads[getattr(m, q)] = nh
                heads[getattr(m, k)] = nkv
                heads[getattr(m, v)] = nkv
    return heads


def worker_tp(suite: str, name: str, size: int | None, ratio: float) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    r: dict[str, Any] = {"tool": "torch-pruning", "tp_version": getattr(tp, "__version__", "?")}
    tiny = _tiny()  # warm-up
    tp.pruner.MagnitudePruner(tiny, torch.randn(1, 3, 16, 16), importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=0.5, ignored_layers=[tiny[-1]]).step()
    try:
        model, kind, sizes = build(suite, name)
        r["perturbed_tensors"] = perturb_constants(model)
        r["size"] = size = resolve_size(model, kind, [size] + sizes if size else sizes)
        inputs = make_inputs(kind, size)
        with torch.no_grad():
            ref_shapes = [tuple(t.shape) for t in tensor_leaves(model(*inputs))]
        r["params_before"] = count_params(model)
        r["macs_before"] = count_macs(model, inputs)
        ignored = classifier_layers(model, suite)
        heads = _tp_heads(model, suite)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        r["status"] = "build failed: " + r["status"]
        return r
    example = inputs[0] if len(inputs) == 1 else inputs
    try:
        def step() -> None:
            pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=ratio, ignored_layers=ignored,
                                               **({"num_heads": heads} if heads else {}))
            pruner.step()
        _measured(r, step)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        return r
    r["params_after"] = count_params(model)
    try:
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in tensor_leaves(model(*inputs))]
        r["macs_after"] = count_macs(model, inputs)
    except Exception as exc:  # noqa: BLE001
        r.update(_err(exc))
        r["status"] = "pruned model fails: " + r["status"]
        return r
    r["status"] = "ok" if shapes == ref_shapes else f"output shapes changed: {ref_shapes} -> {shapes}"
    return r


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def run_worker(tool: str, suite: str, name: str, size: int | None, ratio: float, timeout: float,
               threads: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--suite", suite, "--models", name,
           "--ratio", str(ratio), "--threads", str(threads)] + (["--size", str(size)] if size else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        partial = [json.loads(line[len(PARTIAL_TAG):]) for line in out.splitlines() if line.startswith(PARTIAL_TAG)]
        r = partial[-1] if partial else {"tool": tool}
        done = r.pop("stage_done", None)
        r.update(status=f"timeout (after {done})" if done else "timeout", worker_s=timeout,
                 error=f"the worker did not finish within {timeout:.0f} s" + (f"; stages done: {done}" if done else ""))
        return r
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["worker_s"] = time.perf_counter() - t0
            return out
    tail = "\n".join(p.stderr.strip().splitlines()[-15:])
    return {"tool": tool, "status": f"crash (rc={p.returncode})", "error": tail, "worker_s": time.perf_counter() - t0}


def load_results(path: str) -> dict[str, Any]:
    if path and os.path.exists(path):
        return load(path)
    return {"runs": []}


def save_results(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(path, json.loads(json.dumps(data, default=str)), __file__)


def environment() -> dict[str, Any]:
    import platform

    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "machine": platform.machine()}
    for mod in ("torchvision", "timm", "transformers", "torch_pruning", "fxprune"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:  # which fxprune source was measured
        import fxprune
        src = os.path.dirname(os.path.abspath(fxprune.__file__))
        env["fxprune_path"] = src
        env["fxprune_commit"] = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip() or os.environ.get("FXPRUNE_COMMIT")
    except Exception:  # noqa: BLE001
        pass
    return env


# models whose float64 equivalence check needs ~10 GB: never two of them at once across parallel sweeps
BIG = {"vit_h_14", "regnet_y_128gf", "regnet_y_32gf", "vit_l_16", "vit_l_32"}


def _claim(args: argparse.Namespace, suite: str, name: str) -> bool:
    """With --parallel-dir, several sweeps share one model list: each model is run by the first to claim it,
    and models already in any JSON under that directory are skipped."""
    if not args.parallel_dir:
        return True
    os.makedirs(args.parallel_dir, exist_ok=True)
    for p in glob.glob(os.path.join(args.parallel_dir, "*.json")):
        try:
            if any(r["suite"] == suite and r["model"] == name for r in load_results(p)["runs"]):
                return False
        except (OSError, ValueError, KeyError):
            pass
    try:
        os.close(os.open(os.path.join(args.parallel_dir, f"claim.{suite}.{name}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


class _big_lock:
    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.path = os.path.join(args.parallel_dir, "big.lock") if args.parallel_dir and name in BIG else None

    def __enter__(self) -> None:
        if self.path:
            import fcntl
            self.f = open(self.path, "w")
            fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        if self.path:
            self.f.close()


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    suites = ["torchvision", "timm", "hf"] if args.suite == "all" else [args.suite]
    try:
        import torch_pruning  # noqa: F401
        have_tp = not args.no_tp
    except ImportError:
        have_tp = False
    data = load_results(args.out) if args.resume else {"runs": []}
    data["env"] = environment()
    data["env"]["threads_per_worker"] = args.threads
    data["ratio"] = args.ratio
    done = {(r["suite"], r["model"]) for r in data["runs"]}
    for suite in suites:
        names = args.models.split(",") if args.models else list_models(suite)
        for i, name in enumerate(names):
            if (suite, name) in done or not _claim(args, suite, name):
                continue
            row: dict[str, Any] = {"suite": suite, "model": name, "fxprune_commit": data["env"].get("fxprune_commit")}
            with _big_lock(args, name):
                row["fxprune"] = run_worker("fxprune", suite, name, args.size, args.ratio, args.timeout, args.threads)
                if have_tp:
                    row["tp"] = run_worker("tp", suite, name, row["fxprune"].get("size") or args.size, args.ratio,
                                           args.timeout, args.threads)
            data["runs"].append(row)
            if args.out:
                save_results(args.out, data)
            fx, tpr = row["fxprune"], row.get("tp", {})
            print(f"[{suite} {i + 1}/{len(names)}] {name}: fxprune {fx['status'][:80]} "
                  f"{_fmt(fx.get('time_s'), '.2f')}s err={_fmt(fx.get('max_rel_err'), '.1e')} | "
                  f"tp {tpr.get('status', '-')[:60]} {_fmt(tpr.get('time_s'), '.2f')}s", flush=True)
    return data["runs"]


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _g(v: Any) -> str:
    return "-" if v is None else f"{v / 1e9:.3f}"


def _m(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def _short_status(s: str | None) -> str:
    if s is None:
        return "-"
    return s if len(s) <= 48 else s[:45] + "..."


COLUMNS = ["suite", "model", "size", "nodes", "groups (prunable)", "fxprune", "GMACs", "fx GMACs after",
           "Mparams", "fx Mparams after", "max rel err", "fx time s", "fx CPU s", "fx peak extra MiB (x params)",
           "TP", "TP GMACs after", "TP Mparams after", "TP time s", "TP CPU s", "fx/TP time (CPU)"]


def _error(fx: dict[str, Any]) -> str:
    """The max relative error the status rests on: the dense heads' where the detections were not comparable."""
    if fx.get("max_rel_err_dense") is not None and _exact(fx):
        return _fmt(fx["max_rel_err_dense"], ".1e") + " (dense heads)"
    return _fmt(fx.get("max_rel_err"), ".1e")


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in runs:
        fx, tpr = r.get("fxprune", {}), r.get("tp") or {}
        key = "cpu_s" if fx.get("cpu_s") and tpr.get("cpu_s") else "time_s"
        ratio = (fx[key] / tpr[key]) if fx.get(key) and tpr.get(key) else None
        mem = fx.get("peak_extra_bytes")
        mem_s = "-" if mem is None else f"{mem / 2**20:.0f} ({mem / max(fx.get('param_bytes') or 1, 1):.2f}x)"
        rows.append([
            r["suite"], r["model"], str(fx.get("size") or tpr.get("size") or "-"), str(fx.get("nodes", "-")),
            f"{fx['groups']} ({fx['prunable_groups']})" if "groups" in fx else "-",
            _short_status(fx.get("status")),
            _g(fx.get("macs_before") or tpr.get("macs_before")), _g(fx.get("macs_after")),
            _m(fx.get("params_before") or tpr.get("params_before")), _m(fx.get("params_after")),
            _error(fx), _fmt(fx.get("time_s"), ".2f"), _fmt(fx.get("cpu_s"), ".2f"), mem_s,
            _short_status(tpr.get("status")) if tpr else "not run",
            _g(tpr.get("macs_after")), _m(tpr.get("params_after")), _fmt(tpr.get("time_s"), ".2f"),
            _fmt(tpr.get("cpu_s"), ".2f"), _fmt(ratio, ".2f") + ("" if key == "cpu_s" or ratio is None else " (wall)"),
        ])
    return rows


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """y ~ slope x + intercept: (slope, intercept, R^2)."""
    (icpt, slope), r2 = least_squares([xs], ys)
    return slope, icpt, r2


def least_squares(columns: list[list[float]], ys: list[float]) -> tuple[list[float], float]:
    """y ~ c0 + c1 x1 + c2 x2 + ...: the coefficients (intercept first) and R^2."""
    import numpy as np
    y = np.asarray(ys, float)
    x = np.column_stack([np.ones_like(y)] + [np.asarray(c, float) for c in columns])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    ss_res, ss_tot = float(((y - x @ coef) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return [float(c) for c in coef], 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def _exact(r: dict[str, Any]) -> bool:
    """fxprune's run was exact: "ok", or "ok (dense heads; ...)" where a detector's detections tie-break
    differently and what feeds them (the dense heads) is compared instead."""
    return str(r.get("status", "")).startswith("ok")


def totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    fx_ok = [r for r in runs if _exact(r["fxprune"]) or r["fxprune"].get("status") == "inexact"]
    tp_ran = [r for r in fx_ok if (r.get("tp") or {}).get("status") == "ok"]
    # a Torch-Pruning run that removed nothing did not do the same job: its time is not compared
    tp_ok = [r for r in tp_ran if not _tp_pruned_nothing(r)]
    t: dict[str, Any] = {"models": len(runs), "fxprune_ok": sum(_exact(r["fxprune"]) for r in runs),
                         "fxprune_inexact": sum(r["fxprune"].get("status") == "inexact" for r in runs),
                         "fxprune_failed": len(runs) - len(fx_ok),
                         "tp_ok": sum((r.get("tp") or {}).get("status") == "ok" for r in runs),
                         "tp_timeout": sum((r.get("tp") or {}).get("status", "").startswith("timeout") for r in runs)}
    for key, label in (("time_s", "wall"), ("cpu_s", "cpu")):
        both = [r for r in tp_ok if r["fxprune"].get(key) and r["tp"].get(key)]
        if not both:
            continue
        fx_t = sum(r["fxprune"][key] for r in both)
        tp_t = sum(r["tp"][key] for r in both)
        ratios = sorted(((r["fxprune"][key] / r["tp"][key], r["model"]) for r in both), reverse=True)
        t[label] = dict(n=len(both), fx_total_s=fx_t, tp_total_s=tp_t, total_ratio=fx_t / tp_t,
                        slower_2x=[f"{m} ({q:.1f}x)" for q, m in ratios if q > 2], worst_ratio=ratios[0],
                        best_ratio=ratios[-1])
        timed = [r for r in fx_ok if r["fxprune"].get("nodes") and r["fxprune"].get(key)]
        if len(timed) >= 3:
            slope, icpt, r2 = linear_fit([r["fxprune"]["nodes"] for r in timed], [r["fxprune"][key] for r in timed])
            t[label].update(fit_n=len(timed), fit_ms_per_node=slope * 1e3, fit_intercept_s=icpt, fit_r2=r2)
            # time also grows with the bytes of weights sliced and copied: nodes and GB together
            coef, r2b = least_squares([[r["fxprune"]["nodes"] for r in timed],
                                       [r["fxprune"].get("param_bytes", 0) / 1e9 for r in timed]],
                                      [r["fxprune"][key] for r in timed])
            t[label].update(fit2_intercept_s=coef[0], fit2_ms_per_node=coef[1] * 1e3, fit2_s_per_gb=coef[2],
                            fit2_r2=r2b)
    t["tp_pruned_nothing"] = [f"{r['model']} ({r['tp'].get('cpu_s', 0):.2f} s against fxprune's "
                              f"{r['fxprune'].get('cpu_s', 0):.2f} s)" for r in tp_ran if _tp_pruned_nothing(r)]
    t["tp_timeouts"] = [r["model"] for r in runs if (r.get("tp") or {}).get("status", "").startswith("timeout")]
    mem = sorted(((r["fxprune"]["peak_extra_bytes"] / r["fxprune"]["param_bytes"], r["model"]) for r in fx_ok
                  if r["fxprune"].get("peak_extra_bytes") is not None and r["fxprune"].get("param_bytes")),
                 reverse=True)
    if mem:
        t.update(mem_worst_x=mem[0], mem_median_x=mem[len(mem) // 2][0],
                 mem_over_2x=[f"{m} ({q:.2f}x)" for q, m in mem if q > 2])
    return t


CLEAR_ERRORS = ("TraceError", "CompactionError", "SelectionError", "NothingToPruneError")


def verdict(fx: dict[str, Any]) -> str:
    """One word for a family's outcome (see the module docstring)."""
    status = fx.get("status", "")
    if status == "inexact":
        return "SILENT INEXACT"
    if status == "ok":
        if fx.get("prunable_channels") == 0:
            return "exact, nothing prunable"  # every group frozen: the note says why
        return "exact, inexact frozen" if fx.get("inexact_frozen_groups") else "exact"
    if status.split(":")[0] in CLEAR_ERRORS:
        return "refused"
    if status.startswith("equivalence check failed") and (fx.get("max_rel_err_float32") or 1.0) <= 1e-5:
        return "exact (float32)"  # the graph fixes a dtype, so only the float32 check can run
    return "failed"


def family_markdown(runs: list[dict[str, Any]]) -> str:
    families = {v: k for k, v in timm_families().items()}
    out = ["| family (timm module) | smallest model | size | verdict | prunable / frozen channels | "
           "inexact groups frozen | max rel err | time s | note |", "|---|---|---|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for r in sorted(runs, key=lambda r: families.get(r["model"], r["model"])):
        fx = r.get("fxprune", {})
        v = verdict(fx)
        counts[v] = counts.get(v, 0) + 1
        note = "; ".join(fx.get("inexact_reasons") or []) if v.startswith("exact") else fx.get("status", "")
        if v == "exact, nothing prunable":
            note = next(iter(fx.get("frozen_reasons") or {}), note)
        out.append(f"| {families.get(r['model'], '?')} | {r['model']} | {fx.get('size', '-')} | {v} | "
                   f"{fx.get('prunable_channels', '-')} / {fx.get('frozen_channels', '-')} | "
                   f"{fx.get('inexact_frozen_groups', '-')} | {_fmt(fx.get('max_rel_err'), '.1e')} | "
                   f"{_fmt(fx.get('time_s'), '.2f')} | {note[:120].replace('|', '/')} |")
    total = sum(counts.values())
    out += ["", "- " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + f" (of {total} families)"]
    return "\n".join(out) + "\n"


def _tp_pruned_nothing(r: dict[str, Any]) -> bool:
    tp = r.get("tp") or {}
    return tp.get("params_after") is not None and tp.get("params_after") == r["fxprune"].get("params_before") \
        and tp.get("macs_after") == r["fxprune"].get("macs_before")


def markdown(runs: list[dict[str, Any]], title: str = "") -> str:
    out = [f"### {title}" if title else "", "", "| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in table_rows(runs):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(out + ["", summary(runs)])


def summary(runs: list[dict[str, Any]]) -> str:
    t = totals(runs)
    out = [f"- models: {t['models']}; fxprune exact: {t['fxprune_ok']}, inexact (> {EXACT_TOL:g}): "
           f"{t['fxprune_inexact']}, failed: {t['fxprune_failed']}; Torch-Pruning ok: {t['tp_ok']}, "
           f"timeouts: {t['tp_timeout']}"]
    for label, what in (("cpu", "CPU time"), ("wall", "wall time")):
        if label not in t:
            continue
        s = t[label]
        out.append(f"- {what}, over the {s['n']} models both handled: fxprune {s['fx_total_s']:.1f} s vs "
                   f"Torch-Pruning {s['tp_total_s']:.1f} s (ratio {s['total_ratio']:.2f}); worst per-model "
                   f"fxprune/TP {s['worst_ratio'][0]:.2f} ({s['worst_ratio'][1]}), best {s['best_ratio'][0]:.2f} "
                   f"({s['best_ratio'][1]}); fxprune > 2x slower on {len(s['slower_2x'])}: "
                   f"{', '.join(s['slower_2x']) or 'none'}")
        if "fit_r2" in s:
            out.append(f"  - fxprune {what} vs traced-graph nodes ({s['fit_n']} models): "
                       f"{s['fit_ms_per_node']:.3f} ms/node, intercept {s['fit_intercept_s']:.2f} s, "
                       f"R^2 = {s['fit_r2']:.3f}")
        if "fit2_r2" in s:
            out.append(f"  - fxprune {what} vs nodes and parameter bytes together: {s['fit2_ms_per_node']:.3f} ms/node "
                       f"+ {s['fit2_s_per_gb']:.2f} s/GB, intercept {s['fit2_intercept_s']:.2f} s, "
                       f"R^2 = {s['fit2_r2']:.3f}")
    if t["tp_pruned_nothing"]:
        out.append(f"- Torch-Pruning ran but removed nothing (same parameters and MACs; not in the time "
                   f"comparison) on: {', '.join(t['tp_pruned_nothing'])}")
    if t["tp_timeouts"]:
        out.append(f"- Torch-Pruning timed out on: {', '.join(t['tp_timeouts'])}")
    if "mem_worst_x" in t:
        out.append(f"- fxprune peak extra memory (peak RSS during prune - RSS before): median "
                   f"{t['mem_median_x']:.2f}x parameter bytes, worst {t['mem_worst_x'][0]:.2f}x "
                   f"({t['mem_worst_x'][1]}); over 2x on: {', '.join(t['mem_over_2x']) or 'none'}")
    return "\n".join(out) + "\n"


def print_table(runs: list[dict[str, Any]]) -> None:
    rows = table_rows(runs)
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(*COLUMNS, title="fxprune zoo (l1)")
        for row in rows:
            table.add_row(*row)
        Console(width=300).print(table)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="torchvision",
                    choices=["torchvision", "timm", "timm-families", "hf", "detection", "all"])
    ap.add_argument("--models", default="", help="comma-separated model names (default: the whole suite)")
    ap.add_argument("--size", type=int, default=None, help="input size (default: 64 where the model allows)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model per tool")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1: the pruning itself is single-threaded Python, "
                         "and one thread keeps timings stable on a shared machine; 0 = torch's default)")
    ap.add_argument("--out", default="", help="JSON results file (written after every model)")
    ap.add_argument("--resume", action="store_true", help="keep the results already in --out, skip those models")
    ap.add_argument("--parallel-dir", default="", help="share one model list between several sweeps running at "
                    "once (claim files there; JSON results there are skipped); write --out into that directory")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table and totals")
    ap.add_argument("--from-json", nargs="*", default=None, help="report on saved results instead of running")
    ap.add_argument("--worker", choices=["fxprune", "tp"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        warnings.simplefilter("ignore")
        if args.threads > 0:
            import torch
            torch.set_num_threads(args.threads)
        fn = worker_fxprune if args.worker == "fxprune" else worker_tp
        result = fn(args.suite, args.models, args.size, args.ratio)
        print(RESULT_TAG + json.dumps(result, default=str), flush=True)
        return

    if args.from_json is not None:
        paths = [p for pat in (args.from_json or ["benchmarks/results/zoo_*.json"]) for p in sorted(glob.glob(pat))]
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for p in paths:  # one table per suite; a model measured twice keeps its last measurement
            for r in load_results(p)["runs"]:
                merged[(r["suite"], r["model"])] = r
        by_suite: dict[str, list[dict[str, Any]]] = {}
        for r in merged.values():
            by_suite.setdefault(r["suite"], []).append(r)
        order = {s: i for i, s in enumerate(["torchvision", "timm", "hf"])}
        groups = [(s, sorted(rs, key=lambda r: r["model"])) for s, rs in
                  sorted(by_suite.items(), key=lambda kv: order.get(kv[0], 9))]
    else:
        groups = [(args.suite, sweep(args))]
    for name, runs in groups:
        if not runs:
            continue
        if name == "timm-families":
            print(family_markdown(runs))
        elif args.markdown:
            print(markdown(runs, name))
        else:
            print_table(runs)
            print(summary(runs))

if __name__ == "__main__":
    main()
