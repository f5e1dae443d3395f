"""Hugging Face models built from small configs: traced through torch.export, heads removed whole, exact."""
import pytest
import torch
import transformers

import fxprune
from fxprune.testing import assert_equivalent

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    return transformers.BertModel(cfg), (IDS,), 4


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), (IDS,), 4


def _llama_gqa():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, use_cache=False)
    return transformers.LlamaForCausalLM(cfg), (IDS,), 2  # whole kv groups go: 2 per layer


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    return transformers.ViTModel(cfg), (torch.randn(2, 3, 32, 32),), 4


def _t5():
    cfg = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                use_cache=False)
    return transformers.T5Model(cfg), {"input_ids": IDS, "decoder_input_ids": IDS}, 4


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "llama_gqa": _llama_gqa, "vit": _vit, "t5": _t5}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_heads_and_mlp_pruned_exactly(name):
    model, inputs, heads = BUILDERS[name]()
    model.eval()
    res = fxprune.prune(model, inputs, "l1", 0.5)
    head_groups = [g for g in res.groups.prunable if g.block > 1 and len(g) == heads]
    assert head_groups, f"no prunable head groups found:\n{res.groups}"
    for g in head_groups:  # whole heads (or kv groups) go: half of them
        assert int(res.removed[g.channels].sum()) == heads // 2
    assert_equivalent(model, res, inputs)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in res.module.parameters())
    assert after < 0.9 * before
    # The output keeps its structure (a ModelOutput) and its shapes.
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with torch.no_grad():
        ref, got = model(*args, **kwargs), res.module(*args, **kwargs)
    assert type(got) is type(ref)
    for key in ref.keys():
        if isinstance(ref[key], torch.Tensor):
            assert got[key].shape == ref[key].shape


def test_llama_view_literals_rewritten():
    model, inputs, _ = _llama_gqa()
    res = fxprune.prune(model.eval(), inputs, "l1", 0.5)
    q = res.module.get_parameter("model.layers.0.self_attn.q_proj.weight")
    k = res.module.get_parameter("model.layers.0.self_attn.k_proj.weight")
    assert q.shape == (32, 64) and k.shape == (16, 64)  # 2 of 4 query heads, 1 of 2 kv heads, head dim 16
    with torch.no_grad():
        out = res.module(torch.randint(0, 100, (3, 8)))  # another batch size
    assert out.logits.shape == (3, 8, 100)
