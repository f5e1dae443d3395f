"""Mixture-of-experts folders pruned with calibration text, from disk: routed experts removed by routing frequency,
or each expert's neurons by their routed activations, on a trained model, against controls.

Trains a small Mixtral-architecture language model (4 decoder blocks, hidden 128, 4 heads with 2 key/value heads,
8 experts of width 128 per block, 2 picked per token, with Mixtral's load-balancing loss at 0.02; 1.8 M parameters;
the vocabulary is the 256 byte values) on the standard library's source (the corpus and split of
``benchmarks/lm_folders.py``), saves it as a Hugging Face folder, then prunes the folder from disk with the CLI
(``fxprune run DIR --pass experts --calib``) and measures every result's perplexity on held-out text with
``fxprune eval DIR --text``:

- experts: 2 and 4 of the 8 experts of every block removed, the least picked by the router on the calibration
  text (``by=frequency``) or those carrying the least routing weight (``by=weight``); control: experts chosen at
  random (three seeds, the mean);
- neurons: 25% and 50% of every expert's neurons removed, the least active on the tokens routed to it
  (``unit=neurons``); controls: the smallest by weight magnitude (L1 of the neuron's gate and up rows and down
  column) and at random (three seeds, the mean).

The controls are written by the same plan and writer as the pass (``fxprune.checkpoints.experts.plan_removal``),
only the choice differs. Calibration: 64 windows of 256 bytes of the training text; perplexity per byte on the
first ``--eval-bytes`` held-out bytes. No recovery: the numbers are the cut itself.

    python benchmarks/lm_experts.py --out benchmarks/results/lm_experts.json   # ~12 min
    python benchmarks/lm_experts.py --steps 20 --eval-bytes 8192              # a quick smoke run
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import save
from lm_folders import BATCH, LR, SEED, SEQ, fit, fxprune_cli, trained

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
              tie_word_embeddings=False, router_aux_loss_coef=0.02)
EXPERTS, FRACTIONS, SEEDS = [2, 4], [0.25, 0.5], [0, 1, 2]


def train(train_bytes: bytes, steps: int) -> tuple[torch.nn.Module, list[float]]:
    """The Mixtral-architecture model trained as lm_folders trains its LLaMA (``lm_folders.fit``), the
    load-balancing loss included."""
    import transformers as T

    torch.manual_seed(SEED)
    model = T.MixtralForCausalLM(T.MixtralConfig(**CONFIG, output_router_logits=True))
    losses = fit(model, train_bytes, steps)
    model.config.output_router_logits = False
    return model.eval(), losses


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t = trained(train, args, work)
    model, losses, train_s, src, calib, evalt, text = t.model, t.losses, t.seconds, t.src, t.calib, t.evalt, t.text
    rows = [dict(fxprune_cli("eval", str(src), *text)[0], method="dense", removed="-", unit="-")]
    print(f"dense: perplexity {rows[0]['perplexity']:.3f} (trained in {train_s:.0f} s)", flush=True)
    for k in EXPERTS:
        for by in ("frequency", "weight"):
            rows.append(_pass(src, work / f"experts-{by}-{k}", ["--opt", f"count={k}", "--opt", f"by={by}"], text,
                              calib, dict(method=f"experts, by={by}", removed=f"{k} of 8 experts", unit="experts")))
        rows.append(_control(src, work, evalt, "experts", k, "random", model))
    for fraction in FRACTIONS:
        rows.append(_pass(src, work / f"neurons-{fraction}", ["--opt", "unit=neurons", "--ratio", str(fraction)],
                          text, calib, dict(method="experts, unit=neurons (activation)",
                                            removed=f"{fraction:.0%} of each expert's neurons", unit="neurons")))
        for how in ("magnitude", "random"):
            rows.append(_control(src, work, evalt, "neurons", round(fraction * CONFIG["intermediate_size"]), how,
                                 model))
    return {"config": CONFIG, "steps": args.steps, "batch": BATCH, "seq": SEQ, "lr": LR, "train_seconds": train_s,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "calibration": {"windows": 64, "length": SEQ}, "eval_bytes": len(t.held_out),
            "rows": rows}


def _pass(src: Path, out: Path, how: list[str], text: list[str], calib: Path, row: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = fxprune_cli("run", str(src), "--pass", "experts", *how, "--calib", str(calib), "--out", str(out),
                         "--quiet")
    seconds = time.perf_counter() - t0
    ppl = fxprune_cli("eval", str(out), *text)[0]
    row.update(ppl, params_before=report["params"]["before"], params_after=report["params"]["after"],
               prune_seconds=seconds, removed_experts=report["experts"]["removed"],
               picks=report["experts"]["picks"], calibration=report.get("calibration"))
    print(f"{row['method']} {row['removed']}: perplexity {ppl['perplexity']:.3f}, "
          f"params {row['params_after'] / row['params_before']:.3f}", flush=True)
    return row


def _control(src: Path, work: Path, evalt: Path, unit: str, k: int, how: str, model: torch.nn.Module) \
        -> dict[str, Any]:
    """The same removal chosen at random (the mean over SEEDS) or by weight magnitude, written by the pass's own
    plan and writer."""
    from fxprune.checkpoints import Checkpoint, perplexity
    from fxprune.checkpoints.experts import moe_layers, plan_removal
    from fxprune.checkpoints.stream import DecoderStream

    ckpt = Checkpoint(src)
    stream = DecoderStream(ckpt)
    layers = moe_layers(stream)
    results = []
    for seed in SEEDS if how == "random" else [None]:
        rng = np.random.default_rng(seed)
        kept_experts, kept_neurons = {}, {}
        for m in layers:
            if unit == "experts":
                kept_experts[m.index] = sorted(rng.choice(m.count, m.count - k, replace=False).tolist())
            else:
                kept_neurons[m.index] = [_kept_neurons(model, m.index, e, m.width, k, how, rng) for e in range(m.count)]
        plan = plan_removal(stream, layers, kept_experts, kept_neurons, unit)
        out = work / f"control-{unit}-{k}-{how}-{seed}"
        out.mkdir()
        plan.write(ckpt, out, ckpt.shard_bytes())
        results.append(perplexity(out, evalt, SEQ))
    ppl = {key: float(np.mean([r[key] for r in results])) for key in ("perplexity", "bits_per_byte")}
    total = sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
    after = sum(int(np.prod(t.shape)) for t in Checkpoint(out).tensors.values())
    removed = f"{k} of 8 experts" if unit == "experts" else f"{k / layers[0].width:.0%} of each expert's neurons"
    row = dict(ppl, method=f"control: {how}" + (f" (mean of {len(SEEDS)} seeds)" if how == "random" else ""),
               removed=removed, unit=unit, params_before=total, params_after=after,
               perplexity_per_seed=[r["perplexity"] for r in results] if how == "random" else None)
    print(f"{row['method']} {row['removed']}: perplexity {ppl['perplexity']:.3f}", flush=True)
    return row


def _kept_neurons(model: torch.nn.Module, layer: int, e: int, width: int, k: int, how: str,
                  rng: np.random.Generator) -> list[int]:
    if how == "random":
        return sorted(rng.choice(width, width - k, replace=False).tolist())
    experts = model.model.layers[layer].mlp.experts
    with torch.no_grad():
        rows = experts.gate_up_proj[e].abs().sum(1)
        score = rows[:width] + rows[width:] + experts.down_proj[e].abs().sum(0)
    return sorted(np.argsort(score.numpy(), kind="stable")[k:].tolist())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    parser.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes perplexity is measured on")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxprune-moe-") as tmp:
        results = measure(args, Path(tmp))
    if args.out is not None:
        save(args.out, results, __file__, started)
    return results


if __name__ == "__main__":
    main()
