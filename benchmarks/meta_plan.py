"""Trace and analyze a LLaMA-70B-shaped model whose weights are on the meta device (no weight memory).

The analysis needs shapes only, so a model far larger than memory can be planned: this measures the
time and peak memory of ``fxprune.tracing.tracer`` and ``fxprune.analysis`` on the 70B configuration (80 layers,
hidden 8192, MLP 28672, 64 query heads sharing 8 key/value heads, vocabulary 128256), built from its
config directly on the meta device, on a short token sequence.

    python benchmarks/meta_plan.py                         # LLaMA-70B shape, 8 tokens
    python benchmarks/meta_plan.py --layers 8 --tokens 32  # smaller, quicker
    python benchmarks/meta_plan.py --out benchmarks/results/meta_plan.json

Peak memory is the peak resident set after the model is built (``VmHWM``, reset through
``/proc/self/clear_refs`` where writable, else ``ru_maxrss``) minus the resident set before it was built.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
import warnings

from _results import save


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args(argv)

    import torch
    import transformers as T

    import fxprune

    warnings.filterwarnings("ignore")
    config = T.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=args.layers,
                           num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=4096, use_cache=False)
    gc.collect()
    _reset_peak()
    rss0 = _rss_mb()
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.zeros(1, args.tokens, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    gm = fxprune.trace(model, {"input_ids": tokens})
    t1 = time.perf_counter()
    groups = fxprune.analyze(gm)
    t2 = time.perf_counter()
    heads = [g for g in groups.prunable if any(p.name.endswith("q_proj.weight") for p in g.params)]
    mlp = [g for g in groups.prunable if any(p.name.endswith("gate_proj.weight") for p in g.params)]
    out = {
        "config": {"layers": args.layers, "hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8,
                   "vocab": 128256, "tokens": args.tokens},
        "parameters_billion": params / 1e9,
        "frontend": gm.meta.get("fxprune.frontend"),
        "nodes": len(gm.graph.nodes),
        "elements": int(groups.table.total),
        "groups": len(groups), "prunable_groups": len(groups.prunable),
        "attention_head_groups": len(heads), "head_group_shape": f"{len(heads[0])}x{heads[0].block}" if heads else None,
        "mlp_groups": len(mlp), "mlp_group_channels": len(mlp[0]) if mlp else None,
        "trace_s": round(t1 - t0, 2), "analyze_s": round(t2 - t1, 2),
        "peak_extra_mb": round(_peak_mb() - rss0, 1),
        "torch": torch.__version__, "transformers": T.__version__,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        save(args.out, out, __file__)
    return out


if __name__ == "__main__":
    main()
