"""Mixture-of-experts folders (``fxprune.checkpoints.experts``): routed experts removed by how often the router
picks them on calibration text, or each expert's neurons by their activations, streamed from disk; the result
loads with ``from_pretrained`` and equals the original with the removed experts' router logits at minus infinity
(or the removed neurons zeroed)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import save_file
from typer.testing import CliRunner

import fxprune
from fxprune.checkpoints import Checkpoint, CheckpointError, TextData, prune_checkpoint
from fxprune.checkpoints.perplexity import perplexity
from fxprune.checkpoints.text import text_windows
from fxprune.cli import app
from fxprune.passes.base import PassError
from fxprune.selection.budget import SelectionError

SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {  # (class, config, top-k weights renormalised)
    "mixtral": lambda: (T.MixtralForCausalLM, T.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=6,
                                                              num_experts_per_tok=2), True),
    "qwen2_moe": lambda: (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(**SMALL, intermediate_size=64,
                                                                  moe_intermediate_size=24,
                                                                  shared_expert_intermediate_size=40, num_experts=6,
                                                                  num_experts_per_tok=2), False),
}
LENGTH = 32


def _save(tmp_path, family, edit=None, name="src"):
    torch.manual_seed(0)
    cls, cfg, renorm = FAMILIES[family]()
    cfg._experts_implementation = "eager"  # float64: transformers' grouped kernel has none
    model = cls(cfg).double().eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(tmp_path / name, max_shard_size="40KB")
    return model, tmp_path / name, renorm


def _text(texts, **kw):
    return TextData(calib=texts[0], length=LENGTH, samples=16, **kw)


def _ids(folder, texts):
    return text_windows(Checkpoint(folder), texts[1], LENGTH, 2).batches[0]


def _load(cls, folder):
    model = cls.from_pretrained(folder, dtype=torch.float64, experts_implementation="eager").eval()
    return model


def _router_masked(model, removed, renorm):
    """The original model with each removed expert's router logit at minus infinity (the softmax, top-k and
    renormalisation as the family computes them)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, out, gone=removed[i]):
            logits = out[0].clone()
            logits[:, gone] = float("-inf")
            top, index = torch.topk(F.softmax(logits.float(), dim=-1), mod.top_k, dim=-1)
            if renorm:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    return handles


def _routing_counts(model, ids):
    """Per layer, how many tokens the model in memory sends to each expert."""
    counts = []
    handles = [layer.mlp.experts.register_forward_hook(
        lambda m, args, out: counts.append(torch.bincount(args[1].reshape(-1), minlength=m.num_experts)))
        for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_perplexity_of_a_moe_folder_equals_the_model_in_memory(tmp_path, texts, family):
    """The expert tensors are stored one per expert and assembled as transformers assembles them at load."""
    model, folder, _ = _save(tmp_path, family)
    got = perplexity(folder, texts[1], LENGTH)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in text_windows(Checkpoint(folder), texts[1], LENGTH).batches:
            logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-10)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removed_experts_equal_the_original_with_their_router_logits_at_minus_infinity(tmp_path, texts, family):
    model, folder, renorm = _save(tmp_path, family)
    r = prune_checkpoint(folder, tmp_path / "out", "experts", 0.5, text=_text(texts))
    assert all(len(gone) == 3 for gone in r.removed.values())
    cls = type(model)
    pruned = _load(cls, tmp_path / "out")
    assert pruned.config.to_dict()[next(iter(r.report["config_changes"]))] == 3
    ids = _ids(folder, texts)
    handles = _router_masked(model, r.removed, renorm)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, pruned(input_ids=ids).logits
    for h in handles:
        h.remove()
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())  # the routing weights are float32
    assert r.report["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert float((got - unmasked).abs().max()) > 1e-3  # the removal did change the model


@pytest.mark.parametrize("by", ["frequency", "weight"])
def test_the_experts_removed_are_the_least_routed_on_the_calibration_text(tmp_path, texts, by):
    """Counted independently: the model in memory, hooked, on the same calibration windows."""
    model, folder, _ = _save(tmp_path, "mixtral")
    r = prune_checkpoint(folder, tmp_path / "out", "experts", options={"by": by, "count": 2}, text=_text(texts))
    windows = text_windows(Checkpoint(folder), texts[0], LENGTH, 16).batches
    totals = [torch.zeros(6, dtype=torch.long) for _ in range(2)]
    for ids in windows:
        for i, c in enumerate(_routing_counts(model, ids)):
            totals[i] += c
    for i, total in enumerate(totals):
        assert r.stats[i].picks.tolist() == total.tolist()
        score = r.stats[i].picks if by == "frequency" else r.stats[i].weight
        assert r.removed[i] == sorted(np.argsort(score, kind="stable")[:2].tolist())
        assert r.report["experts"]["picks"][str(i)] == total.tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removed_neurons_equal_the_original_with_them_zeroed(tmp_path, texts, family):
    model, folder, _ = _save(tmp_path, family)
    r = prune_checkpoint(folder, tmp_path / "out", "experts", 0.25, options={"unit": "neurons"}, text=_text(texts))
    width = r.width[0]
    assert r.width == (width, width - round(0.25 * width))
    pruned = _load(type(model), tmp_path / "out")
    ids = _ids(folder, texts)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            kept = pruned.model.layers[i].mlp.experts
            for e in range(experts.num_experts):
                # the pruned expert's rows are some of the original's: find which, zero the others
                rows = [int((experts.down_proj[e].T - col).abs().sum(1).argmin()) for col in kept.down_proj[e].T]
                gone = sorted(set(range(width)) - set(rows))
                assert len(gone) == width - r.width[1]
                experts.gate_up_proj[e, gone] = 0
                experts.gate_up_proj[e, [width + j for j in gone]] = 0
                experts.down_proj[e][:, gone] = 0
        want, got = model(input_ids=ids).logits, pruned(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-10 * float(want.abs().max())


def test_the_neurons_silent_on_the_text_go_first_even_with_large_weights(tmp_path, texts):
    """Neurons whose gate rows are zero never fire (silu(0) = 0), however large their up and down weights: the
    activation score removes them, a magnitude score would keep them."""
    silent = [1, 4, 9, 13, 20, 22]

    def edit(model):
        for layer in model.model.layers:
            ex = layer.mlp.experts
            ex.gate_up_proj[:, silent] = 0
            ex.gate_up_proj[:, [48 + j for j in silent]] *= 50
            ex.down_proj[:, :, silent] *= 50
    _, folder, _ = _save(tmp_path, "mixtral", edit)
    r = prune_checkpoint(folder, tmp_path / "out", "experts", options={"unit": "neurons", "count": 6},
                         text=_text(texts))
    for stats in r.stats.values():
        for e in range(6):
            if stats.picks[e]:
                assert sorted(np.argsort(stats.neurons[e], kind="stable")[:6].tolist()) == silent


def test_experts_stacked_on_disk_are_narrowed_each_by_its_own_neurons(tmp_path, texts):
    """A folder whose expert tensors are stored stacked (the model's own names): each expert keeps its own
    neurons, written as one slice of a copy whose kept neurons come first."""
    model, folder, _ = _save(tmp_path, "qwen2_moe")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stacked / "model.safetensors"))
    (stacked / "config.json").write_text((folder / "config.json").read_text())
    r = prune_checkpoint(stacked, tmp_path / "out", "experts", 0.5, options={"unit": "neurons"}, text=_text(texts))
    pruned = _load(T.Qwen2MoeForCausalLM, tmp_path / "out")
    per_disk = prune_checkpoint(folder, tmp_path / "out2", "experts", 0.5, options={"unit": "neurons"},
                                text=_text(texts))
    again = _load(T.Qwen2MoeForCausalLM, tmp_path / "out2")
    assert r.width == per_disk.width == (24, 12)
    for a, b in zip(pruned.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # the same neurons chosen and written, whichever way the folder stores them
    kept = [sorted(set(range(24)) - set(np.argsort(r.stats[0].neurons[e], kind="stable")[:12].tolist()))
            for e in range(6)]
    assert len({tuple(k) for k in kept}) > 1  # the experts keep different neurons
    for e in range(6):
        assert torch.equal(pruned.model.layers[0].mlp.experts.down_proj[e],
                           model.model.layers[0].mlp.experts.down_proj[e][:, kept[e]])


def test_depth_renumbers_the_per_expert_tensors_of_a_moe_folder(tmp_path, texts):
    model, folder, _ = _save(tmp_path, "mixtral")
    r = prune_checkpoint(folder, tmp_path / "out", "depth", options={"blocks": 1}, text=_text(texts))
    pruned = _load(T.MixtralForCausalLM, tmp_path / "out")
    assert pruned.config.num_hidden_layers == 1
    kept = 1 - r.removed[0]
    src = model.model.layers[kept].mlp.experts.gate_up_proj
    assert torch.equal(pruned.model.layers[0].mlp.experts.gate_up_proj, src)


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_what_cannot_be_done_is_refused_with_why(tmp_path, texts):
    """Each refusal names the problem, writes nothing and leaves the source folder as it was."""
    _, folder, _ = _save(tmp_path, "mixtral")
    before = _contents(folder)
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        prune_checkpoint(folder, tmp_path / "a", "experts", options={"count": 5}, text=_text(texts))
    with pytest.raises(SelectionError, match="--target-params"):
        prune_checkpoint(folder, tmp_path / "b", "experts", budget=fxprune.Budget(target_macs=0.5), text=_text(texts))
    with pytest.raises(PassError, match="unit"):
        prune_checkpoint(folder, tmp_path / "c", "experts", 0.5, options={"unit": "heads"}, text=_text(texts))
    with pytest.raises(PassError, match="--calib"):
        prune_checkpoint(folder, tmp_path / "d", "experts", 0.5)
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**SMALL, intermediate_size=64)).save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="no routed experts"):
        prune_checkpoint(tmp_path / "dense", tmp_path / "e", "experts", 0.5, text=_text(texts))
    assert not any((tmp_path / n).exists() for n in "abcde")
    prune_checkpoint(folder, tmp_path / "f", "experts", 0.5, options={"unit": "neurons"}, text=_text(texts))
    assert _contents(folder) == before


def test_a_params_target_sets_how_many_experts_go(tmp_path, texts):
    _, folder, _ = _save(tmp_path, "mixtral")
    r = prune_checkpoint(folder, tmp_path / "out", "experts", budget=fxprune.Budget(target_params=0.6),
                         text=_text(texts))
    params = r.report["params"]
    assert params["after"] <= 0.6 * params["before"]
    fewer = len(r.removed[0]) - 1
    assert params["before"] - (params["before"] - params["after"]) * fewer / len(r.removed[0]) > 0.6 * params["before"]


def test_the_cli_prunes_experts_and_reports_them(tmp_path, texts):
    _, folder, _ = _save(tmp_path, "qwen2_moe")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(folder), "--pass", "experts", "--ratio", "0.34", "--calib",
                                   str(texts[0]), "--seq-length", str(LENGTH), "--calib-samples", "8",
                                   "--eval-text", str(texts[1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["experts"]["before"] == 6 and report["experts"]["after"] == 4
    assert report["config_changes"] == {"num_experts": [6, 4]}
    assert report["perplexity"]["after"]["perplexity"] > 0
    assert "experts per layer" in res.output


def test_inspect_shows_each_experts_share_of_the_calibration_tokens(tmp_path, texts):
    _, folder, _ = _save(tmp_path, "mixtral")
    res = CliRunner().invoke(app, ["inspect", str(folder), "--calib", str(texts[0]), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["experts"]
    tokens = sum(b.numel() for b in text_windows(Checkpoint(folder), texts[0], 256, 64).batches)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(sum(r["picks"]) == 2 * tokens and sum(r["share"]) == pytest.approx(1.0) for r in rows)
    res = CliRunner().invoke(app, ["inspect", str(folder), "--calib", str(texts[0])])
    assert res.exit_code == 0 and "routed experts on the calibration text" in res.output
