"""The output folder of ``fxprune run``: the measured costs, the exported programs, report.json and report.md, the
charts, every file written into a staging folder renamed into place at the end."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune import artifacts
from fxprune.measure import count_macs, count_params, latency_ms
from fxprune.recovery.curves import plot_log, write_log

from .deploy import ONNX, ORIGINAL_ONNX, export_onnx
from .report import group_rows, layer_rows, pass_report, plot_blocks, plot_channels, plot_histogram, render_markdown
from .runconfig import TARGET_KEYS, RunConfig, recovery_of

REPORT_JSON, REPORT_MD, CHART = "report.json", "report.md", "channels.png"


TRAIN_LOG, TRAIN_CHART = "train_log.jsonl", "training.png"  # only when recovery ran


HISTOGRAM = "_histogram.png"  # NAME_histogram.png for each histogram a pass reports (slimming: gamma)


def measured_costs(module: nn.Module, inputs: Any) -> dict[str, Any]:
    return {"macs": count_macs(module, inputs), "params": count_params(module),
            "latency_ms": latency_ms(module, inputs)}


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape)
    if isinstance(inputs, (tuple, list)):
        return [_shapes(v) for v in inputs]
    if isinstance(inputs, dict):
        return {k: _shapes(v) for k, v in inputs.items()}
    return repr(inputs)


def export_programs(model: nn.Module, result: Any, inputs: Any) -> dict[str, torch.export.ExportedProgram]:
    """model.pt2 and original.pt2 as programs, each keeping the input axes the pruned model keeps free; none for
    a model compacted by resizing its modules (it has no graph to save)."""
    if getattr(result, "compaction", {}).get("target", "graph") != "graph":
        return {}
    return {artifacts.MODEL: artifacts.export_program(result.compacted, inputs, result.shapes),
            artifacts.ORIGINAL: artifacts.export_program(model, inputs, result.shapes)}


def write_folder(out: Path, force: bool, result: Any, programs: dict[str, torch.export.ExportedProgram],
           report: dict[str, Any], onnx: bool = False) -> None:
    """Every file of the output folder, into a temporary folder renamed into place at the end."""
    with artifacts.staging_folder(out, force=force) as tmp:
        for name, program in programs.items():
            torch.export.save(program, str(tmp / name))
        if programs:
            if onnx:  # from the saved programs, checked with onnxruntime; the report says how they compared
                info = export_onnx(tmp)
                report["onnx"] = {**info, "path": ONNX,
                                  "original": {**info["original"], "path": ORIGINAL_ONNX}}
        # the modules target: no program to export; model.safetensors + plan.json, fxprune.load(DIR, model=...)
        artifacts.save_weights(result.compacted, tmp / artifacts.WEIGHTS)
        artifacts.save_plan(result.plan, tmp / artifacts.PLAN)
        artifacts.write_json(report, tmp / REPORT_JSON)
        (tmp / REPORT_MD).write_text(render_markdown(report))
        plot_channels(report["groups"], tmp / CHART,
                      title=f"{Path(report['model_file']).name}: channels kept per group")
        for write in getattr(result, "artifacts", {}).values():  # files the pass adds (sanp's dynamic/)
            write(tmp)
        if result.report.get("stages"):
            plot_blocks(result.report["stages"], tmp / "blocks.png",
                        title=f"{Path(report['model_file']).name}: residual blocks kept per stage")
        for name, hist in result.report.get("histograms", {}).items():
            plot_histogram(hist, tmp / f"{name}{HISTOGRAM}", title=f"{report['pass']}: {hist.get('xlabel', name)}")
        log = report["finetune"]["log"]
        if log:
            write_log(tmp / TRAIN_LOG, log)
            plot_log(log, tmp / TRAIN_CHART, title=f"{report['finetune']['mode']} after {report['pass']}")


def build_report(cfg: RunConfig, the_pass: Any, inputs: Any, before: dict, pruned: dict, after: dict, result: Any,
            log: list[dict[str, float]], clock: dict[str, float], notes: list[str],
            attack: Any = None) -> dict[str, Any]:
    from fxprune import __version__

    groups = group_rows(result)
    return {
        "fxprune_version": __version__, "torch_version": torch.__version__,
        "model_file": str(cfg.model_file), "pass": cfg.method, "options": dataclasses.asdict(the_pass),
        "compaction": dict(getattr(result, "compaction", {"target": "graph", "why": ""})),
        "ratio": cfg.ratio, "device": cfg.device, "example_inputs": _shapes(inputs),
        # the input axes the pruned model takes at any size (checked at a second size), and those it fixes
        "input_axes": result.shapes.report(),
        "target": {k.removeprefix("target_"): float(v) for k, v in cfg.budget.items()
                   if k in TARGET_KEYS and v is not None} or None,
        # with --target-latency: the latency model's measured and predicted milliseconds (``before``/``pruned`` hold
        # the pruned model's measured latency_ms)
        "latency_model": getattr(result, "latency", None),
        "attack": None if attack is None else {"name": "pgd", "eps": attack.eps, "steps": attack.steps,
                                               "step": attack.step_length,
                                               "from": "--attack" if cfg.attack else "the pass"},
        "before": before, "pruned": pruned, "after": after,
        "finetune": {"mode": cfg.recover, "distill": cfg.distill, "epochs": len(log),
                     "lr": recovery_of(cfg, len(log)).rate,
                     "scratch_b_cap": cfg.scratch_b_cap, "kd_alpha": cfg.kd_alpha,
                     "kd_temperature": cfg.kd_temperature, "max_grad_norm": recovery_of(cfg, len(log)).clip,
                     "log": log},
        "groups": groups, "frozen_groups": len(result.groups) - len(groups),
        "layers": layer_rows(result), "allow_inexact": cfg.allow_inexact,
        "pass_report": pass_report(result.report), "notes": notes,
        # a pass that pruned a model of its own (scratch's expand): totals and plan.json refer to it
        "base": None if result.base is None else {
            "built_by_pass": True, "params": sum(p.numel() for p in result.base.parameters())},
        "seconds": {"prune": clock.get("prune"), "finetune": clock.get("finetune"),
                    "total": time.perf_counter() - clock["start"]},
    }
