"""Hugging Face families pruned from their folders: which widths each config can express.

For each family, a small config (hidden 64, 2 layers, 4 heads in 2 key/value groups where the family has
them, MLP 128) is saved with ``save_pretrained`` in shards, pruned from the folder with l1 at 0.5
(``fxprune.prune_checkpoint``, uniform widths across layers), loaded back with the family's class and
``from_pretrained`` alone, and compared with the original whose pruned rows and columns are zeroed
(float64; Mixtral in float32, its grouped expert kernel has no float64). Reports the config fields that
changed, the parameters kept and why the kinds that stayed whole did.

    python benchmarks/hf_folders.py [--out benchmarks/results/hf_folders.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from _results import save


def families() -> dict[str, Callable[[], tuple[type, Any]]]:
    import transformers as T

    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    gqa = dict(base, num_key_value_heads=2)
    return {
        "llama": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**gqa)),
        "llama (tied embeddings)": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**gqa, tie_word_embeddings=True)),
        "mistral": lambda: (T.MistralForCausalLM, T.MistralConfig(**gqa)),
        "qwen2": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**gqa)),
        "qwen3": lambda: (T.Qwen3ForCausalLM, T.Qwen3Config(**gqa, head_dim=16)),
        "gemma": lambda: (T.GemmaForCausalLM, T.GemmaConfig(**gqa, head_dim=16)),
        "gemma2": lambda: (T.Gemma2ForCausalLM, T.Gemma2Config(**gqa, head_dim=16)),
        "phi3 (fused qkv, gate_up)": lambda: (T.Phi3ForCausalLM, T.Phi3Config(**gqa, pad_token_id=0)),
        "olmo": lambda: (T.OlmoForCausalLM, T.OlmoConfig(**gqa)),
        "mixtral (4 experts)": lambda: (T.MixtralForCausalLM, T.MixtralConfig(**gqa, num_local_experts=4,
                                                                             num_experts_per_tok=2)),
        "gpt2": lambda: (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                                         bos_token_id=0, eos_token_id=0)),
        "gpt_neox": lambda: (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**base)),
        "stablelm": lambda: (T.StableLmForCausalLM, T.StableLmConfig(**gqa)),
        "opt": lambda: (T.OPTForCausalLM, T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64)),
        "falcon": lambda: (T.FalconForCausalLM, T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4)),
        "bert": lambda: (T.BertForMaskedLM, T.BertConfig(**base)),
        "roberta": lambda: (T.RobertaForMaskedLM, T.RobertaConfig(**base)),
        "distilbert": lambda: (T.DistilBertForMaskedLM, T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2,
                                                                           n_heads=4, hidden_dim=128)),
    }


def one(name: str, build: Callable[[], tuple[type, Any]], work: Path) -> dict[str, Any]:
    import torch

    import fxprune
    from fxprune.testing import masked_model

    torch.manual_seed(0)
    cls, cfg = build()
    model = cls(cfg).eval()
    dtype = torch.float32 if name.startswith("mixtral") else torch.float64
    model = model.to(dtype)
    src, out = work / "src", work / "out"
    model.save_pretrained(src, max_shard_size="60KB")
    res = fxprune.prune_checkpoint(src, out, "l1", 0.5)
    pruned = cls.from_pretrained(out, dtype=dtype).eval()
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        err = (masked_model(model, res.plan, res.groups)(input_ids=ids).logits - pruned(input_ids=ids).logits)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    return {"family": name, "loads": True, "max_abs_err": float(err.abs().max()), "params_kept": round(n1 / n0, 3),
            "config_changes": res.report["config_changes"], "kept_whole": res.report["frozen"]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    rows = []
    for name, build in families().items():
        with tempfile.TemporaryDirectory() as work:
            try:
                rows.append(one(name, build, Path(work)))
            except Exception as exc:  # noqa: BLE001 - a family that fails is a row, not the end of the sweep
                rows.append({"family": name, "loads": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        r = rows[-1]
        print(f"{name:28s} {'err %.1e' % r['max_abs_err'] if 'max_abs_err' in r else r.get('error')}  "
              f"{r.get('params_kept', '')}  {r.get('config_changes', '')}", flush=True)
    if args.out:
        save(args.out, rows, __file__, started)
    return rows


if __name__ == "__main__":
    main()
