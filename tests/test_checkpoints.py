"""Hugging Face model folders pruned from disk (``fxprune.checkpoints``): tiny configs saved sharded with
``save_pretrained``, pruned from the folder, reloaded with ``from_pretrained`` and compared in float64 with
the original whose pruned rows and columns are zeroed."""
import hashlib
import json

import numpy as np
import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import fxprune
from fxprune.checkpoints import Checkpoint, CheckpointError, prune_checkpoint
from fxprune.checkpoints.folder import INDEX
from fxprune.cli import app
from fxprune.compaction.plan import slice_tensor
from fxprune.testing import masked_model

SHARD = "60KB"  # tiny models in several shards, with an index
IDS = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
BASE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _llama(**kw):
    return T.LlamaForCausalLM, T.LlamaConfig(**{**BASE, "num_key_value_heads": 2, "tie_word_embeddings": False, **kw})


CASES = {
    "llama": (_llama, {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}),
    "qwen2": (lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**BASE, num_key_value_heads=2)),
              {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    "mistral": (lambda: (T.MistralForCausalLM, T.MistralConfig(**BASE, num_key_value_heads=2)),
                {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}),
    # GPT-2 and BERT derive their head size from hidden / heads: their heads stay, their MLPs shrink
    "gpt2": (lambda: (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                                      bos_token_id=0, eos_token_id=0)), {"n_inner": 128}),
    "bert": (lambda: (T.BertForMaskedLM, T.BertConfig(**BASE)), {"intermediate_size": 64}),
}


def _save(tmp_path, build, name="src"):
    torch.manual_seed(0)
    cls, cfg = build()
    model = cls(cfg).double().eval()
    model.save_pretrained(tmp_path / name, max_shard_size=SHARD)
    return cls, model, tmp_path / name


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_folder_loads_and_equals_masked_original(tmp_path, name):
    build, changes = CASES[name]
    cls, model, src = _save(tmp_path, build)
    assert (src / INDEX).is_file()
    before = _digest(src)
    res = prune_checkpoint(src, tmp_path / "out", "l1", 0.5)
    assert _digest(src) == before  # the source folder is untouched
    assert res.loadable
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in changes} == changes
    out = cls.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(out), _logits(masked_model(model, res.plan, res.groups)), rtol=1e-9, atol=1e-9)
    assert sum(p.numel() for p in out.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
    written = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert len(set(written.values())) > 1  # still sharded
    assert (tmp_path / "out" / "generation_config.json").is_file() or not (src / "generation_config.json").is_file()


def test_gqa_keeps_whole_key_value_groups(tmp_path):
    """8 query heads in 4 key/value groups: a ratio of 0.3 of the heads would split a group; whole groups go
    (one of four), with their two query heads, and num_attention_heads stays a multiple of the kv heads."""
    cls, model, src = _save(tmp_path, lambda: _llama(hidden_size=96, num_attention_heads=8, num_key_value_heads=4))
    res = prune_checkpoint(src, tmp_path / "out", "l1", 0.3)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (6, 3, 12)
    out = cls.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(out), _logits(masked_model(model, res.plan, res.groups)), rtol=1e-9, atol=1e-9)


def test_gqa_head_counts_the_config_accepts(tmp_path):
    """LlamaConfig needs hidden_size to be a multiple of num_attention_heads: 6 of 8 heads does not divide 64,
    so the selection keeps the next count that does (all 8); at 0.5, 4 heads in 2 groups divide it."""
    cls, model, src = _save(tmp_path, lambda: _llama(num_attention_heads=8, num_key_value_heads=4))
    for ratio, heads in ((0.3, (8, 4)), (0.5, (4, 2))):
        prune_checkpoint(src, tmp_path / f"out{ratio}", "l1", ratio)
        config = json.loads((tmp_path / f"out{ratio}" / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == heads
        cls.from_pretrained(tmp_path / f"out{ratio}")
    # 2 kv groups of 2 heads and a ratio of 0.2 (about one of 4 query heads): no whole group goes
    cls, model, src = _save(tmp_path, _llama, "src2")
    prune_checkpoint(src, tmp_path / "out2", "l1", 0.2)
    config = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


def test_a_folder_takes_the_same_budget_as_a_model_and_refuses_what_needs_one_in_memory(tmp_path):
    """budget=fxprune.Budget(...) as fxprune.prune; the previous flat keywords with a DeprecationWarning and the
    same folder; a latency target (it times a model) and a keyword that is no budget's stop before any work."""
    _, _, src = _save(tmp_path, _llama)
    grouped = prune_checkpoint(src, tmp_path / "g", "l1", budget=fxprune.Budget(target_params=0.7))
    with pytest.warns(DeprecationWarning, match="target_params are deprecated"):
        flat = prune_checkpoint(src, tmp_path / "f", "l1", target_params=0.7)
    assert np.array_equal(flat.removed, grouped.removed)
    same = {k: v for k, v in _digest(tmp_path / "g").items() if k != "report.json"}  # report.json: timings
    assert same == {k: v for k, v in _digest(tmp_path / "f").items() if k != "report.json"}
    with pytest.raises(fxprune.selection.budget.SelectionError, match="target_latency.*never loads"):
        prune_checkpoint(src, tmp_path / "l", "l1", budget=fxprune.Budget(target_latency=0.5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'epochs'"):
        prune_checkpoint(src, tmp_path / "e", "l1", epochs=1)
    assert not (tmp_path / "l").exists() and not (tmp_path / "e").exists()


def test_uniform_widths_across_layers_by_default(tmp_path):
    """A ratio for one layer only: uniform (the default) gives every layer the mean width and a loadable folder;
    --per-layer-widths keeps the per-layer result, says it does not load, and writes the widths."""
    cls, model, src = _save(tmp_path, _llama)
    uniform = prune_checkpoint(src, tmp_path / "u", "l1", 0.0,
                               budget=fxprune.Budget(ratio_for={"model.layers.0.mlp.*": 0.5}))
    assert uniform.loadable and len(set(uniform.widths["model.layers.*.mlp.down_proj.weight"])) == 1
    cls.from_pretrained(tmp_path / "u", dtype=torch.float64)
    with pytest.warns(UserWarning, match="not loadable by from_pretrained"):
        per_layer = prune_checkpoint(src, tmp_path / "p", "l1", 0.0,
                                     budget=fxprune.Budget(ratio_for={"model.layers.0.mlp.*": 0.5},
                                                           uniform_across_layers=False))
    assert not per_layer.loadable and "across layers" in per_layer.why_not
    assert per_layer.widths["model.layers.*.mlp.down_proj.weight"] == [64, 128]
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["loadable"] is False and report["widths"]["model.layers.*.mlp.down_proj.weight"] == [64, 128]
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(plan["model.layers.0.mlp.up_proj.weight"]["0"]) == 64
    assert "model.layers.1.mlp.up_proj.weight" not in plan
    # the tensors are the per-layer ones: every written tensor is the source's kept slice (the masked original at
    # those widths), whole where nothing is planned
    written, source = Checkpoint(tmp_path / "p"), Checkpoint(src)
    assert written.tensors["model.layers.0.mlp.up_proj.weight"].shape == (64, 64)
    for name in written.tensors:
        assert torch.equal(written.read(name), fxprune.apply_plan(per_layer.plan, name, source.read(name))), name


def test_residual_stream_with_allow_inexact(tmp_path):
    cls, model, src = _save(tmp_path, _llama)
    res = prune_checkpoint(src, tmp_path / "out", "l1", 0.5, allow_inexact=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["head_dim"] == 16
    out = cls.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert _logits(out).shape == (2, 8, 100)
    assert res.report["params"]["after"] == sum(p.numel() for p in out.parameters())


def test_renamed_checkpoint_keys_vision(tmp_path):
    """transformers 5 saves ViT under its original key names (encoder.layer.N.attention.attention.query):
    the names are mapped as from_pretrained maps them, and an image shaped from the config drives the trace."""
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_labels=3)
    _, model, src = _save(tmp_path, lambda: (T.ViTForImageClassification, cfg))
    assert any("encoder.layer" in k for k in Checkpoint(src).tensors)
    res = prune_checkpoint(src, tmp_path / "out", "l1", 0.5)
    out = T.ViTForImageClassification.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(out(pixel_values=x).logits,
                                   masked_model(model, res.plan, res.groups)(pixel_values=x).logits)
    assert res.report["config_changes"]["num_attention_heads"] == [4, 2]


def test_read_kept_streams_in_chunks(tmp_path, monkeypatch):
    """Slicing chunk by chunk gives what slicing the whole tensor gives, for kept rows, columns or both."""
    from safetensors.torch import save_file

    import fxprune.checkpoints.folder as folder

    (tmp_path / "config.json").write_text("{}")
    w = torch.randn(37, 11, dtype=torch.bfloat16)
    save_file({"w": w, "b": torch.randn(37)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(folder, "CHUNK_BYTES", 50)  # a few rows per chunk
    ckpt = Checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    for entry in ({0: sorted(rng.choice(37, 9, replace=False).tolist())}, {1: [0, 3, 10]},
                  {0: [0, 1, 2, 36], 1: [5]}, {0: []}, None):
        assert torch.equal(ckpt.read_kept("w", entry), slice_tensor(entry, w))
    assert torch.equal(ckpt.read_kept("b", {0: [2, 30]}), ckpt.read("b")[[2, 30]])


def test_uniform_selection_on_any_model():
    """uniform_across_layers in fxprune.prune: global scope gives layers different widths; uniform, the same."""
    class Block(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
            with torch.no_grad():
                self.fc1.weight.mul_(scale)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    model = torch.nn.Sequential(*[Block(s) for s in (0.2, 1.0, 5.0)]).eval()
    x = torch.randn(4, 16)
    free = fxprune.prune(model, (x,), "l1", 0.5, budget=fxprune.Budget(scope="global"))
    kept = [r["kept"] for r in free.summary() if r["total"] == 32]
    assert len(set(kept)) > 1
    uniform = fxprune.prune(model, (x,), "l1", 0.5, budget=fxprune.Budget(scope="global", uniform_across_layers=True))
    kept = [r["kept"] for r in uniform.summary() if r["total"] == 32]
    assert len(kept) == 3 and len(set(kept)) == 1
    fxprune.testing.assert_equivalent(model, uniform, (x,))


def test_cli_prunes_a_folder(tmp_path):
    cls, model, src = _save(tmp_path, _llama)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(src), "--ratio", "0.5", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["loadable"] and report["config_changes"]["intermediate_size"] == [128, 64]
    assert json.loads((out / "report.json").read_text())["notes"] == report["notes"]
    assert isinstance(T.AutoModelForCausalLM.from_pretrained(out), cls)  # the auto class alone loads it
    r = CliRunner().invoke(app, ["run", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output


@pytest.mark.parametrize("args, message", [
    (["--pass", "slimming"], "reads weights only"),
    (["--epochs", "2"], "cannot apply"),
    (["--onnx"], "cannot apply"),
    (["--ratio-for", "no-equals-sign"], "PATTERN=RATIO"),
])
def test_cli_refuses_what_a_folder_cannot_do(tmp_path, args, message):
    _, _, src = _save(tmp_path, _llama)
    r = CliRunner().invoke(app, ["run", str(src), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "out").exists()


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(tmp_path)
    r = CliRunner().invoke(app, ["run", str(tmp_path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "safetensors" in r.output


def test_streamed_safetensors_read_back(tmp_path):
    """The tensor-by-tensor writer produces files safetensors reads as written, every dtype and odd shape."""
    from safetensors import safe_open

    from fxprune.checkpoints.write import safetensors_stream

    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor(2.5), "d": torch.zeros(0, 4), "e": torch.rand(3) > 0.5,
               "f": torch.randn(2, 3, 4, dtype=torch.float64).transpose(0, 2)}
    with open(tmp_path / "x.safetensors", "wb") as f:
        for (_, t), write in zip(tensors.items(),
                                    safetensors_stream(f, {n: (t.dtype, list(t.shape)) for n, t in tensors.items()})):
            write(t)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    with open(tmp_path / "y.safetensors", "wb") as f, pytest.raises(ValueError, match="header says"):
        next(safetensors_stream(f, {"a": (torch.float32, [2])}))(torch.zeros(3))


def test_cli_inspect_a_folder(tmp_path):
    """`fxprune inspect DIR`: the groups run DIR would prune, GPT-2's heads frozen with the config's reason."""
    _, _, src = _save(tmp_path, CASES["gpt2"][0])
    r = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["architecture"] == "GPT2LMHeadModel"
    whys = [g["why"] for g in info["groups"] if g["status"] == "frozen"]
    assert any("cannot express a narrower n_head" in w for w in whys)
    assert sum(g["status"] == "prunable" for g in info["groups"]) == 2  # the two MLPs
    r = CliRunner().invoke(app, ["inspect", str(src), "--pass", "l1"])
    assert r.exit_code == 2 and "fxprune run" in r.output


def test_single_file_checkpoint_and_shard_size(tmp_path):
    """An unsharded folder (model.safetensors, no index) gives an unsharded folder; shard_bytes splits it."""
    cls, model, _ = _save(tmp_path, _llama)
    model.save_pretrained(tmp_path / "single")
    assert not (tmp_path / "single" / INDEX).exists()
    res = prune_checkpoint(tmp_path / "single", tmp_path / "out", "l1", 0.5)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / INDEX).exists()
    out = cls.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(out), _logits(masked_model(model, res.plan, res.groups)), rtol=1e-9, atol=1e-9)
    prune_checkpoint(tmp_path / "single", tmp_path / "split", "l1", 0.5, shard_bytes=100_000)
    index = json.loads((tmp_path / "split" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(
        t.nbytes for t in Checkpoint(tmp_path / "split").tensors.values())
    torch.testing.assert_close(_logits(cls.from_pretrained(tmp_path / "split", dtype=torch.float64).eval()),
                               _logits(out), rtol=0, atol=0)


def test_quantized_folder_is_refused(tmp_path):
    """A quantized checkpoint (packed tensors) is refused with what to do, before any work."""
    _, _, src = _save(tmp_path, _llama)
    config = json.loads((src / "config.json").read_text())
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for p in src.iterdir():
        (quantized / p.name).write_bytes(p.read_bytes())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="quantized checkpoint .gptq."):
        prune_checkpoint(quantized, tmp_path / "q", "l1", 0.5)
    r = CliRunner().invoke(app, ["run", str(quantized), "-o", str(tmp_path / "q")])
    assert r.exit_code == 2 and "full-precision" in r.output and not (tmp_path / "q").exists()


def test_nothing_prunable_fails_unless_forced(tmp_path, monkeypatch):
    """An architecture none of whose groups can shrink (here: every kind frozen for the config) fails naming
    why, before reading any weight; require_prunable=False writes the folder unchanged."""
    import fxprune.checkpoints.prune as prune_module
    from fxprune.api import NothingToPruneError

    def freeze_all(gm, groups, *args):
        for g in groups.prunable:
            g.frozen = "config.json cannot express it (test)"
        return {}

    monkeypatch.setattr(prune_module, "freeze_unexpressible", freeze_all)
    cls, model, src = _save(tmp_path, _llama)
    with pytest.raises(NothingToPruneError, match="config.json cannot express it"):
        prune_checkpoint(src, tmp_path / "out", "l1", 0.5)
    assert not (tmp_path / "out").exists()
    res = prune_checkpoint(src, tmp_path / "out", "l1", 0.5, require_prunable=False)
    assert not res.plan and res.loadable
    assert Checkpoint(tmp_path / "out").tensors.keys() == Checkpoint(src).tensors.keys()
