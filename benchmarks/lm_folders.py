"""Language model folders pruned with calibration text, from disk: quality on a trained model, and memory.

Part 1, quality. Trains a small LLaMA-architecture language model (8 decoder blocks, hidden 128, 4 heads with 2
key/value heads, MLP 384, SwiGLU; 1.6 M parameters; the vocabulary is the 256 byte values) on the standard
library's source (the corpus of ``examples/charlm.py``: its first 90% trains, the last 10% is held out), saves it
as a Hugging Face folder, then prunes that folder from disk with the CLI and measures the perplexity of every
result on held-out text with ``fxprune eval DIR --text``:

- width: l1, act (activation magnitude on calibration text, Minitron's estimator), act with FLAP's bias
  compensation (``--opt compensate=true``: each removed channel's mean input folded into the next layer's bias)
  and thinet (greedy next-layer error, then least-squares rescaling, layer by layer) at 25% and 50% of the MLP
  neurons and attention heads removed (``--ratio``; the residual stream stays whole: exact by default);
- depth: 2 and 4 of the 8 blocks removed by block influence (ShortGPT) and by the perplexity with the block
  skipped (Minitron).

Calibration text: 64 windows of 256 bytes spread evenly over the training text; held-out text: the first
``--eval-bytes`` of the last 10%. Each pruned folder is measured as written, then after a short distillation
recovery in memory through fxprune's engine (``fxprune.recovery.modes.recover``: ``--recovery-steps`` AdamW steps
at 1e-3, cosine, 16 windows of 256 bytes per step, the dense model as teacher, alpha 0.9, temperature 4), saved
with ``save_pretrained`` and measured the same way; the dense model is given the same steps (distilled from
itself), the reference the recovered column compares with.

Part 2, memory (``--memory``). LLaMA-shaped checkpoints with random bf16 weights (TinyLlama's widths, 1.1 B
parameters at 22 layers, and the same widths at 11 layers; or, ``--mem-shape llama70b``, LLaMA-70B's widths at a
few layers: 0.86 B parameters per layer, a 128,256-token vocabulary), pruned by ``fxprune run DIR --pass act
--calib`` in a child process: its peak resident memory (VmHWM) against the bound: the fixed cost of a process
that only imports torch, transformers and fxprune, plus the larger of one decoder layer in the compute dtype
(float32) and the embedding table as stored, plus the calibration activations (the hidden states of every
window, and one batch's largest intermediates inside a layer) and one shard. Memory independent of depth: the
two peaks differ by less than one layer.

    python benchmarks/lm_folders.py --out benchmarks/results/lm_folders.json            # part 1 (~15 min)
    python benchmarks/lm_folders.py --memory --out benchmarks/results/lm_memory.json    # part 2 (~5 min)
    python benchmarks/lm_folders.py --memory --mem-shape llama70b --mem-layers 3 2 \
        --out benchmarks/results/lm_memory_70b.json                                      # part 2 at 70B widths
    python benchmarks/lm_folders.py --steps 20 --eval-bytes 8192                        # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import example
from _results import save

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
SEQ, BATCH, LR, SEED = 256, 16, 3e-3, 0
CALIB_WINDOWS = 64
RECOVERY_LR = 1e-3
WIDTH = [("l1", 0.25, []), ("l1", 0.5, []), ("act", 0.25, []), ("act", 0.5, []),
         ("act", 0.25, ["compensate=true"]), ("act", 0.5, ["compensate=true"]), ("thinet", 0.25, []),
         ("thinet", 0.5, [])]
DEPTH = [("bi", 2), ("bi", 4), ("ppl", 2), ("ppl", 4)]


def corpus() -> tuple[bytes, bytes]:
    """The character LM example's corpus: (training bytes, held-out bytes)."""
    raw = b"".join(p.read_bytes() for p in example("charlm").corpus_files())
    cut = int(len(raw) * 0.9)
    return raw[:cut], raw[cut:]


def train(train_bytes: bytes, steps: int) -> tuple[torch.nn.Module, list[float]]:
    """The LLaMA-architecture model trained for ``steps`` AdamW steps (cosine schedule) on random windows."""
    import transformers as T

    torch.manual_seed(SEED)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG))
    return model.eval(), fit(model, train_bytes, steps)


def fit(model: torch.nn.Module, train_bytes: bytes, steps: int) -> list[float]:
    """``steps`` AdamW steps (one-cycle schedule, clipped at norm 1) of BATCH random windows of SEQ bytes; the
    model's own loss (with its auxiliary terms). Returns the losses."""
    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (BATCH,), generator=gen)
        ids = torch.stack([data[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def calibration_text(train_bytes: bytes) -> bytes:
    """CALIB_WINDOWS windows of SEQ bytes spread evenly over the training text, concatenated."""
    stride = (len(train_bytes) - SEQ) // CALIB_WINDOWS
    return b"".join(train_bytes[i * stride:i * stride + SEQ] for i in range(CALIB_WINDOWS))


def fxprune_cli(*args: str) -> dict[str, Any]:
    """``fxprune ARGS --json`` in a child process: its JSON output."""
    proc = subprocess.run([sys.executable, "-m", "fxprune", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fxprune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


@dataclass
class Trained:
    """A model trained on the corpus and saved as a folder, with the calibration and held-out text files."""

    model: torch.nn.Module
    losses: list[float]
    seconds: float
    train_bytes: bytes
    held_out: bytes
    src: Path
    calib: Path
    evalt: Path

    @property
    def text(self) -> list[str]:
        return ["--text", str(self.evalt), "--seq-length", str(SEQ)]


def trained(make: Callable[[bytes, int], tuple[torch.nn.Module, list[float]]], args: argparse.Namespace,
            work: Path) -> Trained:
    """``make(train_bytes, steps)`` timed, saved as ``work/dense``, and the text files beside it."""
    train_bytes, held_out = corpus()
    t0 = time.perf_counter()
    model, losses = make(train_bytes, args.steps)
    out = Trained(model, losses, time.perf_counter() - t0, train_bytes, held_out[:args.eval_bytes], work / "dense",
                  work / "calib.txt", work / "eval.txt")
    model.save_pretrained(out.src)
    out.calib.write_bytes(calibration_text(train_bytes))
    out.evalt.write_bytes(out.held_out)
    return out


def quality(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t = trained(train, args, work)
    losses, train_s, train_bytes, src, calib, evalt, text = \
        t.losses, t.seconds, t.train_bytes, t.src, t.calib, t.evalt, t.text
    held_out = t.held_out
    rows = [dict(fxprune_cli("eval", str(src), *text)[0], method="dense", removed="-", kind="dense")]
    print(f"dense: perplexity {rows[0]['perplexity']:.3f}", flush=True)
    if args.recovery_steps:  # the reference of the recovered column: the dense model given the same steps
        rows[0]["recovered"] = _recovered(src, src, work / "dense-recovered", train_bytes, evalt, args.recovery_steps)
    runs = [(f"{method}-{ratio}{'-'.join([''] + opts)}",
             ["--pass", method, "--ratio", str(ratio)] + [a for o in opts for a in ("--opt", o)],
             dict(method=method + (" + bias compensation" if "compensate=true" in opts else ""),
                  removed=f"{ratio:.0%} of MLP neurons and heads", kind="width", ratio=ratio))
            for method, ratio, opts in WIDTH]
    runs += [(f"depth-{by}-{blocks}", ["--pass", "depth", "--opt", f"by={by}", "--opt", f"blocks={blocks}"],
              dict(method=f"depth ({by})", removed=f"{blocks} of 8 blocks", kind="depth", blocks=blocks))
             for by, blocks in DEPTH]
    for name, how, row in runs:
        row = _pruned(src, work / name, how, text, calib, row)
        if args.recovery_steps:
            row["recovered"] = _recovered(src, work / name, work / f"{name}-recovered", train_bytes, evalt,
                                          args.recovery_steps)
        rows.append(row)
    return {"config": CONFIG, "steps": args.steps, "recovery_steps": args.recovery_steps,
            "recovery_lr": RECOVERY_LR, "batch": BATCH, "seq": SEQ, "lr": LR, "train_seconds": train_s,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "calibration": {"windows": CALIB_WINDOWS, "length": SEQ}, "eval_bytes": len(held_out),
            "rows": rows}


def _pruned(src: Path, out: Path, how: list[str], text: list[str], calib: Path, row: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = fxprune_cli("run", str(src), *how, "--calib", str(calib), "--out", str(out), "--quiet")
    seconds = time.perf_counter() - t0
    ppl = fxprune_cli("eval", str(out), *text)[0]
    row.update(ppl, params_before=report["params"]["before"], params_after=report["params"]["after"],
               prune_seconds=seconds, calibration=report.get("calibration"),
               removed_blocks=(report.get("blocks") or {}).get("removed"))
    print(f"{row['method']} {row['removed']}: perplexity {ppl['perplexity']:.3f}, "
          f"params {row['params_after'] / row['params_before']:.3f}", flush=True)
    return row


class _Logits(torch.nn.Module):
    """A causal LM returning its logits (what the engine's loss and distillation read)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def _recovered(dense: Path, pruned: Path, out: Path, train_bytes: bytes, evalt: Path, steps: int) -> dict[str, Any]:
    """The pruned folder distilled from the dense model for ``steps`` steps with fxprune's engine, saved and
    measured (perplexity on the held-out text, streamed as the others)."""
    import transformers as T

    from fxprune.checkpoints import perplexity
    from fxprune.recovery.modes import recover

    student = _Logits(T.LlamaForCausalLM.from_pretrained(pruned))
    teacher = _Logits(T.LlamaForCausalLM.from_pretrained(dense)).eval()
    data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(SEED + 1)
    loader = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen).tolist()
        ids = torch.stack([data[s:s + SEQ + 1] for s in starts])
        loader.append((ids[:, :-1], ids[:, 1:]))
    t0 = time.perf_counter()
    log = recover(student, mode="finetune", original=teacher, train_loader=loader, epochs=1, distill=True,
                  loss=lambda out, y: torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
                  lr=RECOVERY_LR, optimizer="adamw", max_grad_norm=1.0)
    seconds = time.perf_counter() - t0
    student.lm.save_pretrained(out)
    ppl = perplexity(out, evalt, SEQ)
    print(f"  recovered ({steps} steps, {seconds:.0f} s): perplexity {ppl['perplexity']:.3f}", flush=True)
    return {"perplexity": ppl["perplexity"], "bits_per_byte": ppl["bits_per_byte"], "seconds": seconds,
            "train_loss": log[-1].get("loss") if log else None}


# --- part 2: memory ------------------------------------------------------------------------------------------


def memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import hf_stream

    from fxprune.checkpoints.text import BATCH as CALIB_BATCH

    widths = {"tinyllama": hf_stream.TINYLLAMA, "llama70b": hf_stream.LLAMA70B}[args.mem_shape]
    calib = work / "calib.txt"
    train_bytes, _ = corpus()
    calib.write_bytes(train_bytes[:args.mem_windows * SEQ * 2])
    code, _, imports_mb, _ = hf_stream._child(["-c", hf_stream.IMPORTS])
    assert code == 0
    runs = []
    for layers in args.mem_layers:
        folder = work / f"llama-{layers}"
        info = hf_stream.write_checkpoint(folder, layers, args.shard_mb, widths=widths)
        out = work / f"llama-{layers}-act"
        code, seconds, peak_mb, _ = hf_stream._child(
            ["-m", "fxprune", "run", str(folder), "--pass", "act", "--ratio", "0.25", "--calib", str(calib),
             "--calib-samples", str(args.mem_windows), "--seq-length", str(SEQ), "--out", str(out), "--quiet"])
        report = json.loads((out / "report.json").read_text()) if code == 0 else {}
        runs.append({**info, "exit_code": code, "seconds": seconds, "peak_mb": peak_mb, "imports_mb": imports_mb,
                     **_bound_parts(widths, args.mem_windows, CALIB_BATCH),
                     "shard_mb": info["largest_shard_bytes"] / 2**20,
                     "calibration": report.get("calibration"), "seconds_by_stage": report.get("seconds")})
        shutil.rmtree(folder)
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(runs[-1]), flush=True)
    return {"runs": runs, "windows": args.mem_windows, "seq": SEQ, "shape": args.mem_shape, "widths": widths}


def _bound_parts(widths: dict, windows: int, batch: int) -> dict[str, float]:
    """The terms of the memory bound, MB: one decoder layer in float32, the embedding table as stored (bf16: the
    stream converts the rows it looks up, not the table; held before the layers, never with one), the
    calibration hidden states (every window's input and output of the layer running) and one batch's largest
    intermediates inside a layer (the MLP's gate, up and their product; the attention scores)."""
    h, inter, heads, kv, vocab = (widths[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_key_value_heads", "vocab_size"))
    head_dim = h // heads
    layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    hidden = 2 * windows * SEQ * h
    inside = batch * SEQ * (3 * inter + heads * SEQ)
    return {"layer_fp32_mb": 4 * layer / 2**20, "embedding_stored_mb": 2 * vocab * h / 2**20,
            "activations_mb": 4 * (hidden + inside) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    parser.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes perplexity is measured on")
    parser.add_argument("--recovery-steps", type=int, default=50, help="distillation steps after pruning (0: none)")
    parser.add_argument("--memory", action="store_true", help="part 2: peak memory on 1.1B-shaped checkpoints")
    parser.add_argument("--mem-layers", type=int, nargs="+", default=[22, 11])
    parser.add_argument("--mem-shape", choices=["tinyllama", "llama70b"], default="tinyllama",
                        help="part 2's widths: TinyLlama's (1.1 B at 22 layers) or LLaMA-70B's (0.86 B per layer)")
    parser.add_argument("--mem-windows", type=int, default=16, help="calibration windows of part 2")
    parser.add_argument("--shard-mb", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxprune-lm-") as tmp:
        results = memory(args, Path(tmp)) if args.memory else quality(args, Path(tmp))
    if args.out is not None:
        save(args.out, results, __file__, started)
    return results


if __name__ == "__main__":
    main()
