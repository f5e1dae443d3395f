"""Prune a Hugging Face checkpoint larger than the memory the run may use, from disk.

Writes a LLaMA-shaped checkpoint with random bf16 weights (default: TinyLlama's shape, 1.1 B parameters,
2.2 GB, in shards of about 200 MB, with its index, config.json, generation_config.json and a tokenizer file),
then runs ``fxprune run FOLDER --pass l1 --ratio 0.25`` on it in a child process and reports:

- wall time and peak resident memory of that process (``wait4``'s ``ru_maxrss``), next to the checkpoint's
  size, its largest shard, and the fixed cost of a process that only imports torch, transformers and fxprune;
  target: peak under two shards plus that fixed cost;
- that the output loads with ``LlamaForCausalLM.from_pretrained`` alone (another child) and runs, with the
  parameter count the report promised, and equals the original with its pruned rows and columns zeroed
  (``plan.json``; float32 from the same bf16 weights) on 8 tokens;
- the 70B-shaped plan (LLaMA-70B config, meta device only: trace, analysis, config probe, selection on random
  scores, plan, config rebuild check): seconds and peak memory; target under 30 s.

    python benchmarks/hf_stream.py                          # 2.2 GB checkpoint, writes under /tmp
    python benchmarks/hf_stream.py --layers 4 --plan-layers 8   # quicker smoke run
    python benchmarks/hf_stream.py --out benchmarks/results/hf_stream.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=4096)


def write_checkpoint(folder: Path, layers: int, shard_mb: int, seed: int = 0, widths: dict | None = None) -> dict:
    """A random bf16 checkpoint of ``widths`` (default TinyLlama's) written shard by shard (never the whole model
    in memory)."""
    import torch
    import transformers as T
    from safetensors.torch import save_file

    config = T.LlamaConfig(num_hidden_layers=layers, **(widths or TINYLLAMA))
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T.LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    plan, used = [[]], 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        if plan[-1] and used + n > shard_mb << 20:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += n
    weight_map, total = {}, 0
    for i, group in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in group:
            shape = shapes[name]
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.to_json_file(str(folder / "config.json"))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
    return {"layers": layers, "parameters_billion": round(total / 2 / 1e9, 3), "bytes": sum(sizes),
            "shards": len(sizes), "largest_shard_bytes": max(sizes)}


# Runs a child's job and writes its own peak resident set (VmHWM) on exit. wait4's ru_maxrss cannot serve: Linux
# carries the parent's peak into a child across fork and exec, so every child would report at least this process.
WRAP = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["FXPRUNE_BENCH_PEAK"], "w") as f:
        f.write(hwm)
atexit.register(peak)
kind, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif kind == "-c":
    exec(compile(target, "<child>", "exec"), {"__name__": "__main__"})
else:
    runpy.run_path(target, run_name="__main__")
"""


def _child(args: list[str]) -> tuple[int, float, float, str]:
    """Run ``python args`` (``-m module ...``, ``-c code ...`` or ``script ...``) to the end: exit code, seconds,
    the peak resident memory of that process (MB, its own VmHWM), and its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        env = dict(os.environ, FXPRUNE_BENCH_PEAK=peak.name)
        kind, rest = (args[0], args[1:]) if args[0] in ("-m", "-c") else ("-f", args)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAP, kind, *rest], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
        text = Path(peak.name).read_text().strip()
    return proc.returncode, seconds, int(text) / 1024 if text else float("nan"), proc.stdout


IMPORTS = ("import torch, transformers, fxprune.checkpoints, fxprune.cli.commands; "
           "from transformers import LlamaForCausalLM")

LOAD = """
import json, sys, torch
from transformers import LlamaForCausalLM
from fxprune.testing import masked_model
out, src = sys.argv[1], sys.argv[2]
m = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
ids = torch.arange(8).unsqueeze(0)
with torch.no_grad():
    logits = m(input_ids=ids).logits
params = sum(p.numel() for p in m.parameters())
# exact at scale: the pruned model against the original with its pruned rows and columns zeroed (plan.json),
# both from the same bf16 weights, computed in float32
m = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
plan = {k: {int(d): v for d, v in e.items()} for k, e in json.load(open(f"{out}/plan.json")).items()}
ref = masked_model(LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), plan)
with torch.no_grad():
    got, want = m(input_ids=ids).logits, ref(input_ids=ids).logits
err = float((got - want).abs().max() / want.abs().max())
print(json.dumps({"params": params, "finite": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape),
                  "max_rel_err_vs_masked_original_fp32": err}))
"""


def plan_70b(layers: int, ratio: float) -> dict:
    """The 70B-shaped plan on meta: analysis, config probe, selection on random scores, plan, rebuild check."""
    import numpy as np
    import torch
    import transformers as T

    from fxprune.checkpoints.prune import analyse_architecture
    from fxprune.selection.budget import Selection, select

    t0 = time.perf_counter()
    config = T.LlamaConfig(num_hidden_layers=layers, **LLAMA70B)
    config.architectures = ["LlamaForCausalLM"]

    def tensors(model: torch.nn.Module) -> tuple[dict, dict]:
        state = model.state_dict()
        return {n: n for n in state}, {n: tuple(t.shape) for n, t in state.items()}

    original = config.to_dict()
    arch = analyse_architecture(config, original, tensors)
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    scores = {g.id: rng.random(len(g)) for g in arch.groups.prunable}
    removed = select(arch.groups, scores, arch.selection(Selection(ratio=ratio, uniform_across_layers=True)))
    plan, new_config, why = arch.decide(removed)
    t2 = time.perf_counter()
    return {"layers": layers, "analyse_s": round(t1 - t0, 2), "select_plan_check_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "loadable": new_config is not None, "why_not": why or None,
            "config_changes": {k: [original.get(k), v] for k, v in (new_config or {}).items() if original.get(k) != v},
            "planned_tensors": len(plan)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers of the checkpoint (22: TinyLlama)")
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--plan-layers", type=int, default=80, help="layers of the 70B-shaped plan (80: LLaMA-70B)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    ap.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan_child:
        print(json.dumps(plan_70b(args.plan_layers, args.ratio)))
        return {}

    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fxprune-hf-stream-"))
    src, dst = work / "src", work / "pruned"
    try:
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        ckpt = write_checkpoint(src, args.layers, args.shard_mb)
        ckpt["write_s"] = round(time.perf_counter() - t0, 1)
        print(f"checkpoint: {ckpt}", file=sys.stderr)
        rc, _, fixed_mb, _ = _child(["-c", IMPORTS])
        assert rc == 0
        rc, seconds, peak_mb, text = _child(["-m", "fxprune", "run", str(src), "--pass", "l1", "--ratio",
                                             str(args.ratio), "-o", str(dst), "--json", "--force"])
        if rc != 0:
            raise SystemExit(f"fxprune run failed with exit code {rc}")
        report = json.loads(text)
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
        rc, load_s, load_mb, loaded = _child(["-c", LOAD, str(dst), str(src)])
        loaded = json.loads(loaded) if rc == 0 else {"error": f"exit code {rc}"}
        shard_mb = ckpt["largest_shard_bytes"] / 2**20
        rc, _, plan_mb, plan = _child([__file__, "--plan-child", "--plan-layers", str(args.plan_layers),
                                       "--ratio", str(args.ratio)])
        plan = json.loads(plan) if rc == 0 else {"error": f"exit code {rc}"}
        plan["peak_rss_mb"] = round(plan_mb, 1)
        result = {
            "checkpoint": ckpt, "ratio": args.ratio,
            "prune": {"wall_s": round(seconds, 1), "peak_rss_mb": round(peak_mb, 1),
                      "fixed_import_rss_mb": round(fixed_mb, 1), "largest_shard_mb": round(shard_mb, 1),
                      "checkpoint_mb": round(ckpt["bytes"] / 2**20, 1),
                      "peak_minus_fixed_over_shard": round((peak_mb - fixed_mb) / shard_mb, 2),
                      "target_mb": round(2 * shard_mb + fixed_mb, 1),
                      "target_met": peak_mb < 2 * shard_mb + fixed_mb,
                      "stage_s": report.get("seconds"), "output_mb": round(out_bytes / 2**20, 1),
                      "params": report["params"], "config_changes": report["config_changes"]},
            "load": dict(loaded, seconds=round(load_s, 1), peak_rss_mb=round(load_mb, 1),
                         params_match_report=loaded.get("params") == report["params"]["after"]),
            "plan_70b": dict(plan, target_met=plan.get("total_s", 1e9) < 30),
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        from _results import save  # noqa: PLC0415 - here: the children run this file without benchmarks/ on sys.path

        save(args.out, result, __file__, started)
    return result


if __name__ == "__main__":
    main()
