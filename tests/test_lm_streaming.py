"""Language model folders run one decoder layer at a time from disk (``fxprune.checkpoints.stream``): perplexity,
the act pass on calibration text and depth pruning, against the same model in memory."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from typer.testing import CliRunner

import fxprune
from fxprune.checkpoints import Checkpoint, CheckpointError, prune_checkpoint
from fxprune.checkpoints.calibration import TextData
from fxprune.checkpoints.perplexity import perplexity
from fxprune.checkpoints.stream import DecoderStream
from fxprune.checkpoints.text import text_windows
from fxprune.cli import app
from fxprune.passes.base import PassError
from fxprune.testing import masked_model

SMALL = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, intermediate_size=64)
ARCHS = {
    "llama": lambda n: (T.LlamaForCausalLM, T.LlamaConfig(**SMALL, num_hidden_layers=n, num_key_value_heads=2,
                                                          tie_word_embeddings=False)),
    "qwen2": lambda n: (T.Qwen2ForCausalLM, T.Qwen2Config(**SMALL, num_hidden_layers=n, num_key_value_heads=2)),
    "gpt2": lambda n: (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=256, n_embd=32, n_layer=n, n_head=4,
                                                       bos_token_id=0, eos_token_id=0)),
}
LENGTH = 32


def _save(tmp_path, arch="llama", layers=3, edit=None, name="src"):
    torch.manual_seed(0)
    cls, cfg = ARCHS[arch](layers)
    model = cls(cfg).double().eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(tmp_path / name, max_shard_size="40KB")
    return model, tmp_path / name


def _nll(model, batches):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return total, count


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_streamed_perplexity_equals_the_model_in_memory(tmp_path, texts, arch):
    model, folder = _save(tmp_path, arch)
    got = perplexity(folder, texts[1], LENGTH)
    windows = text_windows(Checkpoint(folder), texts[1], LENGTH)
    nll, count = _nll(model, windows.batches)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-10)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(windows.nbytes), rel=1e-10)
    assert got["tokenizer"].startswith("UTF-8 bytes")


def test_one_decoder_layer_is_loaded_at_a_time(tmp_path, texts):
    """The most tensor bytes held at once is one module outside the layers (the embedding, the head) or one
    decoder layer, whatever the depth."""
    peaks = {}
    for layers in (2, 6):
        model, folder = _save(tmp_path, "llama", layers, name=f"l{layers}")
        result = DecoderStream(Checkpoint(folder)).run(text_windows(Checkpoint(folder), texts[0], LENGTH, 4).batches,
                                                       tail=True)
        outside = model.lm_head.weight.numel() * 8
        layer = sum(p.numel() * 8 for p in model.model.layers[0].parameters())
        assert result.peak_loaded_bytes == max(outside, layer)
        peaks[layers] = result.peak_loaded_bytes
    assert peaks[2] == peaks[6]


def _silence_half_the_neurons(model):
    """Half of every MLP's neurons never fire (their up rows are zero: silu(gate x) * 0) but have the largest gate
    rows: l1 (the producers' |W|) keeps them, activations say they do nothing."""
    for layer in model.model.layers:
        mlp = layer.mlp
        dead = torch.arange(0, mlp.up_proj.out_features, 2)
        mlp.up_proj.weight[dead] = 0
        mlp.gate_proj.weight[dead] *= 50


def test_act_on_a_folder_removes_the_neurons_silent_on_the_text(tmp_path, texts):
    model, folder = _save(tmp_path, edit=_silence_half_the_neurons)
    text = TextData(calib=texts[0], samples=8, length=LENGTH)
    mlp_only = fxprune.Budget(ratio=0.5, protect=("*self_attn*",))
    r = prune_checkpoint(folder, tmp_path / "act", "act", budget=mlp_only, text=text)
    assert not any("self_attn" in name for name in r.plan)
    kept = r.plan["model.layers.0.mlp.down_proj.weight"][1]
    assert sorted(kept) == list(range(1, 64, 2))  # exactly the neurons that fire
    l1 = prune_checkpoint(folder, tmp_path / "l1", "l1", budget=mlp_only)
    assert sorted(l1.plan["model.layers.0.mlp.down_proj.weight"][1]) == list(range(0, 64, 2))  # the silent ones
    # exact: act only scores, so the pruned folder is the masked original
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "act", dtype=torch.float64).eval()
    ids = text_windows(Checkpoint(folder), texts[1], LENGTH, 2).batches[0]
    with torch.no_grad():
        want = masked_model(model, r.plan)(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-10)
    # and the silent neurons cost nothing: the perplexity is the original's
    assert r.report["calibration"]["tokens"] == 8 * LENGTH
    before, after = perplexity(folder, texts[1], LENGTH), perplexity(tmp_path / "act", texts[1], LENGTH)
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-9)


def test_act_scores_heads_with_their_key_value_groups(tmp_path, texts):
    model, folder = _save(tmp_path, "qwen2")
    r = prune_checkpoint(folder, tmp_path / "out", "act", 0.5, text=TextData(calib=texts[0], samples=4,
                                                                              length=LENGTH))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    assert r.report["pass_report"]["scored_by_l1"] == []
    assert T.Qwen2ForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_act_in_memory_reads_the_model_files_train_loader():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():  # channels 0-3 of the first conv never fire (a large negative bias), big weights anyway
        m[0].weight[:4] *= 5
        m[0].bias[:4] = -1e3
    loader = [(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    r = fxprune.prune(m, (torch.randn(2, 3, 6, 6),), "act", 0.5, train_loader=loader)
    assert sorted(r.plan["0.weight"][0]) == [4, 5, 6, 7]
    with pytest.raises(PassError, match="calibration data"):
        fxprune.prune(m, (torch.randn(2, 3, 6, 6),), "act", 0.5)


def _reads_half_the_inputs():
    """Hidden neurons 0-3 read only inputs 0-1, neurons 4-7 only inputs 2-3 (a ReLU after)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].weight[:4, 2:] = 0
        net[0].weight[4:, :2] = 0
        net[0].bias.zero_()
    return net


def test_act_calibrates_on_calib_loader_before_train_loader(tmp_path):
    """calib_loader (a model file's calibration data: a language model's text) is what act reads, train_loader
    only without it; in the command line a model file with calib_loader() and no train_loader() runs act."""
    net = _reads_half_the_inputs()
    calib = [(torch.cat([torch.zeros(8, 2), torch.rand(8, 2)], 1), torch.zeros(8, dtype=torch.long))]
    train = [(torch.cat([torch.rand(8, 2), torch.zeros(8, 2)], 1), torch.zeros(8, dtype=torch.long))]
    r = fxprune.prune(net, (torch.rand(2, 4),), "act", 0.5, calib_loader=calib, train_loader=train)
    assert sorted(r.plan["0.weight"][0]) == [4, 5, 6, 7]  # the neurons the calibration data reaches
    r = fxprune.prune(net, (torch.rand(2, 4),), "act", 0.5, train_loader=train)
    assert sorted(r.plan["0.weight"][0]) == [0, 1, 2, 3]
    model_file = tmp_path / "calib.py"
    model_file.write_text(
        "import torch\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "    with torch.no_grad():\n"
        "        net[0].weight.abs_()\n"
        "        net[0].weight[:4, 2:] = 0\n"
        "        net[0].weight[4:, :2] = 0\n"
        "        net[0].bias.zero_()\n"
        "    return net\n"
        "def example_inputs():\n    return (torch.rand(2, 4),)\n"
        "def calib_loader():\n    return [torch.cat([torch.zeros(8, 2), torch.rand(8, 2)], 1)]\n")
    res = CliRunner().invoke(app, ["run", str(model_file), "--pass", "act", "--ratio", "0.5", "--out",
                                   str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert sorted(plan["0.weight"]["0"]) == [4, 5, 6, 7]


def _input_means(model, windows, layers):
    """The mean input of each named layer over every position of the calibration windows (the model in memory)."""
    sums, counts, handles = {}, {}, []
    for name in layers:
        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in windows:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {name: sums[name] / counts[name] for name in layers}


def _held_at(model, values):
    """Forward pre-hooks that set the given input channels of named layers to fixed values."""
    def hook(idx, v):
        def pre(mod, args):
            x = args[0].clone()
            x[..., idx] = v.to(x.dtype)
            return (x,)
        return pre
    return [model.get_submodule(name).register_forward_pre_hook(hook(idx, v)) for name, (idx, v) in values.items()]


def test_act_compensation_equals_the_original_with_removed_channels_held_at_their_mean(tmp_path, texts):
    """FLAP's bias compensation: the pruned folder (new biases, the config flags that create them) equals the
    original with each removed input channel of the output and down projections held at its calibration mean, not
    zeroed; and it is closer to the original on the calibration text than the same removal without it."""
    model, folder = _save(tmp_path)
    text = TextData(calib=texts[0], samples=8, length=LENGTH)
    r = prune_checkpoint(folder, tmp_path / "flap", "act", 0.5, options={"compensate": True}, text=text)
    plain = prune_checkpoint(folder, tmp_path / "plain", "act", 0.5, text=text)
    assert r.report["config_changes"]["mlp_bias"] == [False, True]
    assert r.report["config_changes"]["attention_bias"] == [False, True]
    assert r.plan == plain.plan  # the same channels: compensation changes the biases, not the choice
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "flap", dtype=torch.float64).eval()
    assert r.report["params"]["after"] == sum(p.numel() for p in pruned.parameters())
    assert not pruned.model.layers[0].self_attn.q_proj.bias.any()  # the flag's other biases: zeros
    consumers = [f"model.layers.{i}.{leaf}" for i in range(3) for leaf in ("self_attn.o_proj", "mlp.down_proj")]
    calib = text_windows(Checkpoint(folder), texts[0], LENGTH, 8).batches
    means = _input_means(model, calib, consumers)
    held = {}
    for name in consumers:
        kept = set(r.plan[f"{name}.weight"][1])
        gone = [j for j in range(means[name].numel()) if j not in kept]
        held[name] = (gone, means[name][gone])
    handles = _held_at(model, held)  # the removed channels' producers then feed nothing: no need to zero them
    ids = text_windows(Checkpoint(folder), texts[1], LENGTH, 2).batches[0]
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, pruned(input_ids=ids).logits
    for h in handles:
        h.remove()
    assert float((got - want).abs().max()) < 1e-6 * float(want.abs().max())  # the bias is summed in float32
    without = T.LlamaForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float64).eval()
    with torch.no_grad():
        ref = model(input_ids=calib[0]).logits
        err = [float((m(input_ids=calib[0]).logits - ref).pow(2).mean()) for m in (pruned, without)]
    assert err[0] < err[1]


def test_act_compensation_skips_with_a_warning_the_layers_no_config_flag_gives_a_bias(tmp_path, texts):
    """Qwen2 has biases on its query, key and value projections only, and no config field to add others."""
    _, folder = _save(tmp_path, "qwen2")
    text = TextData(calib=texts[0], samples=4, length=LENGTH)
    with pytest.warns(UserWarning, match="no config.json field"):
        r = prune_checkpoint(folder, tmp_path / "flap", "act", 0.5, options={"compensate": True}, text=text)
    plain = prune_checkpoint(folder, tmp_path / "plain", "act", 0.5, text=text)
    assert r.config == plain.config
    a = T.Qwen2ForCausalLM.from_pretrained(tmp_path / "flap").state_dict()
    b = T.Qwen2ForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_act_compensation_in_memory_folds_into_existing_biases_and_names_layers_without():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    loader = [(torch.randn(16, 6) + 1.0, torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    r = fxprune.prune(net, (torch.randn(2, 6),), "act", 0.5, options={"compensate": True}, train_loader=loader)
    x = torch.cat([b for b, _ in loader])
    with torch.no_grad():
        hidden = net[1](net[0](x))
        means = {"2": hidden.mean(0), "4": net[3](net[2](hidden)).mean(0)}
    held = {}
    for layer, mean in means.items():
        gone = [j for j in range(len(mean)) if j not in set(r.plan[f"{layer}.weight"][1])]
        assert gone
        held[layer] = (gone, mean[gone])
    handles = _held_at(net, held)
    probe = torch.randn(64, 6) + 1.0
    with torch.no_grad():
        assert torch.allclose(r.module(probe), net(probe), atol=1e-5)
    for h in handles:
        h.remove()
    net[4].bias = None
    with pytest.warns(UserWarning, match=r"no bias to carry .*\(4\)"):
        fxprune.prune(net, (torch.randn(2, 6),), "act", 0.5, options={"compensate": True}, train_loader=loader)


def _identity_block(index):
    def edit(model):
        _layers(model)[index].self_attn.o_proj.weight.zero_()
        _layers(model)[index].mlp.down_proj.weight.zero_()
    return edit


def _layers(model):
    return model.model.layers


@pytest.mark.parametrize("by", ["bi", "ppl"])
def test_depth_removes_the_block_that_does_nothing_and_renumbers(tmp_path, texts, by):
    model, folder = _save(tmp_path, "qwen2", 4, edit=_identity_block(2))
    text = TextData(calib=texts[0], eval_text=texts[1], samples=4, length=LENGTH)
    r = prune_checkpoint(folder, tmp_path / "out", "depth", options={"by": by, "blocks": 1}, text=text)
    assert r.removed == [2]
    assert r.importance[2] == pytest.approx(0.0, abs=1e-6)  # block influence's cosine is taken in float32
    assert min(r.importance[i] for i in (0, 1, 3)) > 1e-3
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and len(cfg["layer_types"]) == 3
    pruned = T.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    ids = text_windows(Checkpoint(folder), texts[1], LENGTH, 2).batches[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits  # the block is the identity: the original IS the model without it
        got = pruned(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-10)
    ppl = r.report["perplexity"]
    assert ppl["after"]["perplexity"] == pytest.approx(ppl["before"]["perplexity"], rel=1e-9)


def test_depth_by_ratio_and_parameter_target(tmp_path, texts):
    model, folder = _save(tmp_path, "llama", 4)
    text = TextData(calib=texts[0], samples=4, length=LENGTH)
    r = prune_checkpoint(folder, tmp_path / "half", "depth", 0.5, text=text)
    assert len(r.removed) == 2 and r.report["blocks"]["after"] == 2
    assert r.removed == sorted(np.argsort(r.importance)[:2].tolist())
    # a kept block's weights are the source's, under its new number
    kept = [i for i in range(4) if i not in r.removed]
    src = Checkpoint(folder)
    out = Checkpoint(tmp_path / "half")
    for new, old in enumerate(kept):
        a = src.read(f"model.layers.{old}.mlp.up_proj.weight")
        assert torch.equal(out.read(f"model.layers.{new}.mlp.up_proj.weight"), a)
    r = prune_checkpoint(folder, tmp_path / "params", "depth", budget=fxprune.Budget(target_params=0.8), text=text)
    total, after = r.report["params"]["before"], r.report["params"]["after"]
    per_block = (total - after) // len(r.removed)
    assert after <= 0.8 * total < after + per_block  # the fewest blocks that meet the target


def test_text_and_pass_refusals(tmp_path, texts):
    _, folder = _save(tmp_path, "llama", 2)
    with pytest.raises(PassError, match="--calib"):
        prune_checkpoint(folder, tmp_path / "o", "act", 0.5)
    with pytest.raises(CheckpointError, match="fewer than one window"):
        perplexity(folder, texts[1], 10 ** 6)
    with pytest.raises(CheckpointError, match="does not exist"):
        perplexity(folder, tmp_path / "missing.txt")
    with pytest.raises(PassError, match="Hugging Face model folder"):
        mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        fxprune.prune(mlp, (torch.randn(1, 4),), "depth", 0.5)
    with pytest.raises(CheckpointError, match="cannot remove 2 of 2"):
        prune_checkpoint(folder, tmp_path / "o", "depth", options={"blocks": 2}, text=TextData(calib=texts[0]))
    assert not (tmp_path / "o").exists()
    small = tmp_path / "small"
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**{**SMALL, "vocab_size": 100}, num_hidden_layers=1)).save_pretrained(small)
    with pytest.raises(CheckpointError, match="too small for UTF-8 bytes"):
        perplexity(small, texts[1], LENGTH)


def test_the_folders_tokenizer_is_used(tmp_path, texts):
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "src"
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**{**SMALL, "vocab_size": 400}, num_hidden_layers=1)).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train([str(texts[0])], tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel
                                                             .alphabet()))
    T.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    got = perplexity(folder, texts[1], LENGTH)
    assert "PreTrainedTokenizerFast" in got["tokenizer"] or "Tokenizer" in got["tokenizer"]
    text = texts[1].read_text()
    assert got["tokens"] < 0.8 * len(text.encode())  # merges: fewer tokens than bytes
    assert math.isfinite(got["bits_per_byte"])


def test_cli_language_model_folder(tmp_path, texts):
    _, folder = _save(tmp_path, "llama", 4)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(folder), "--pass", "act", "--calib", str(texts[0]), "--eval-text",
                              str(texts[1]), "--seq-length", str(LENGTH), "--calib-samples", "4", "--out",
                              str(tmp_path / "act"), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "act" / "report.json").read_text())
    assert report["calibration"]["sequences"] == 4 and report["calibration"]["length"] == LENGTH
    assert report["perplexity"]["after"]["perplexity"] > 0
    res = runner.invoke(app, ["run", str(folder), "--pass", "depth", "--ratio", "0.25", "--calib", str(texts[0]),
                              "--seq-length", str(LENGTH), "--out", str(tmp_path / "depth")])
    assert res.exit_code == 0, res.output
    assert "decoder blocks" in res.output
    res = runner.invoke(app, ["eval", str(folder), str(tmp_path / "depth"), "--text", str(texts[1]),
                              "--seq-length", str(LENGTH), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["model"] for r in rows] == ["original", "pruned"]
    res = runner.invoke(app, ["inspect", str(folder), "--calib", str(texts[0]), "--json"])
    assert res.exit_code == 0, res.output
    blocks = json.loads(res.stdout)["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2, 3] and sorted(b["rank"] for b in blocks) == [0, 1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--pass", "act"], "--calib"),
    (["--pass", "act", "--calib", "MISSING"], "no such file"),
    (["--pass", "slimming", "--calib", "CALIB"], "trains or calibrates"),
])
def test_cli_refuses_bad_text_options(tmp_path, texts, args, message):
    _, folder = _save(tmp_path, "llama", 2)
    args = [str(texts[0]) if a == "CALIB" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    res = CliRunner().invoke(app, ["run", str(folder), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_text_options_for_a_model_file(tmp_path, texts):
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "digits.py"
    res = CliRunner().invoke(app, ["run", str(example), "--calib", str(texts[0]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Hugging Face model folder" in res.output, res.output
    res = CliRunner().invoke(app, ["eval", str(tmp_path), "--text", str(texts[1])])
    assert res.exit_code == 2 and "not a Hugging Face model folder" in res.output, res.output


def _masked_with(model, plan, folder):
    """The original with its pruned rows and columns zeroed and, where the pruned folder holds new values (a
    reconstruction), those values in the kept positions."""
    ref = masked_model(model, plan)
    pruned = Checkpoint(folder)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name not in pruned.tensors or name not in plan:
                continue
            index = torch.meshgrid(*[torch.as_tensor(plan[name].get(d, range(s))) for d, s in enumerate(t.shape)],
                                   indexing="ij")
            t[index] = pruned.read(name).to(t.dtype)
    return ref


def test_thinet_on_a_folder_rebuilds_layer_by_layer_and_is_exact(tmp_path, texts):
    model, folder = _save(tmp_path, edit=_silence_half_the_neurons)
    text = TextData(calib=texts[0], samples=8, length=LENGTH)
    mlp_only = fxprune.Budget(ratio=0.5, protect=("*self_attn*",))
    r = prune_checkpoint(folder, tmp_path / "thinet", "thinet", budget=mlp_only, text=text)
    assert sorted(r.plan["model.layers.0.mlp.down_proj.weight"][1]) == list(range(1, 64, 2))  # the silent go first
    ids = text_windows(Checkpoint(folder), texts[0], LENGTH, 8).batches[0]
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "thinet", dtype=torch.float64).eval()
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
        want = _masked_with(model, r.plan, tmp_path / "thinet")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-9)  # compaction exact, given the reconstructed weights
    # the silent neurons carried nothing: the least squares keeps the rest as they were (scales of 1)
    src, out = Checkpoint(folder), Checkpoint(tmp_path / "thinet")
    kept = r.plan["model.layers.1.mlp.down_proj.weight"][1]
    assert torch.allclose(out.read("model.layers.1.mlp.down_proj.weight"),
                          src.read("model.layers.1.mlp.down_proj.weight")[:, kept], atol=1e-6)


def _twin_neurons(model):
    """Neuron j + 32 of every MLP fires exactly as neuron j and writes half of j's column: removing it is
    undone by scaling j's column by 1.5, the reconstruction ThiNet solves for."""
    for layer in model.model.layers:
        mlp = layer.mlp
        for proj in (mlp.up_proj, mlp.gate_proj):
            proj.weight[32:] = proj.weight[:32]
        mlp.down_proj.weight[:, 32:] = 0.5 * mlp.down_proj.weight[:, :32]


def test_the_streamed_reconstruction_undoes_a_removal_it_can(tmp_path, texts):
    """Removing the twins (neurons 32-63) is undone by scaling neurons 0-31's columns by 1.5: the layer-by-layer
    least squares finds exactly that, in every block, from the calibration text."""
    from fxprune.checkpoints.architecture import checkpoint_tensors, load_config
    from fxprune.checkpoints.calibration import Calibration
    from fxprune.checkpoints.prune import analyse_architecture
    from fxprune.passes._calibrate import reconstruct_streamed
    from fxprune.passes.base import PassContext
    from fxprune.passes.thinet import ThiNet

    model, folder = _save(tmp_path, edit=_twin_neurons)
    ckpt = Checkpoint(folder)
    arch = analyse_architecture(load_config(ckpt.root), ckpt.config, checkpoint_tensors(ckpt))
    ctx = PassContext(arch.gm, arch.groups, arch.model,
                      calibrate=Calibration(ckpt, TextData(calib=texts[0], samples=8, length=LENGTH)))
    removed = np.zeros(len(arch.groups.comp_group), dtype=bool)
    for g in arch.groups.prunable:
        if any(p.name.endswith("mlp.down_proj.weight") and p.role == "consumer" for p in g.params):
            removed[g.channels[32:]] = True
    new = reconstruct_streamed(ctx, removed, ThiNet().solver(), per_batch=64)
    assert sorted(new) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    for i in range(3):
        w = model.model.layers[i].mlp.down_proj.weight
        assert torch.allclose(new[f"model.layers.{i}.mlp.down_proj.weight"][:, :32], 1.5 * w[:, :32], atol=1e-8)
        assert not new[f"model.layers.{i}.mlp.down_proj.weight"][:, 32:].any()


def test_the_layer_by_layer_rewrite_holds_one_layer(tmp_path, texts):
    model, folder = _save(tmp_path, "llama", 4)
    stream = DecoderStream(Checkpoint(folder))
    batches = text_windows(Checkpoint(folder), texts[0], LENGTH, 4).batches
    seen = []

    def edit(run):
        seen.append(run.prefix)
        w = run.root.get_submodule(run.prefix).mlp.down_proj.weight
        w.mul_(0.5)
        return {f"{run.prefix}.mlp.down_proj.weight": w.clone()}

    new = dict(stream.rewrite(batches, edit))
    assert seen == [f"model.layers.{i}" for i in range(4)] and len(new) == 4
    outside = model.lm_head.weight.numel() * 8
    layer = sum(p.numel() * 8 for p in model.model.layers[0].parameters())
    assert stream.peak == max(outside, layer)
    assert torch.equal(new["model.layers.2.mlp.down_proj.weight"], model.model.layers[2].mlp.down_proj.weight * 0.5)


def test_passes_a_folder_cannot_run_say_why(tmp_path, texts):
    _, folder = _save(tmp_path, "llama", 2)
    text = TextData(calib=texts[0], samples=4, length=LENGTH)
    with pytest.raises(PassError, match="layerwise=true fine-tunes"):
        prune_checkpoint(folder, tmp_path / "o", "thinet", 0.5, options={"layerwise": True}, text=text)
    with pytest.raises(PassError, match="trains or calibrates"):
        prune_checkpoint(folder, tmp_path / "o", "slimming", 0.5, text=text)
    assert not (tmp_path / "o").exists()


def test_lasso_on_a_folder_keeps_the_neurons_that_carry_the_output(tmp_path, texts):
    """The silent neurons explain nothing of the down projection's output: LASSO zeroes them first; its least
    squares then refit the kept columns (to the same values: the silent ones carried nothing)."""
    model, folder = _save(tmp_path, edit=_silence_half_the_neurons)
    text = TextData(calib=texts[0], samples=8, length=LENGTH)
    mlp_only = fxprune.Budget(ratio=0.5, protect=("*self_attn*",))
    r = prune_checkpoint(folder, tmp_path / "lasso", "lasso", budget=mlp_only, text=text)
    assert sorted(r.plan["model.layers.2.mlp.down_proj.weight"][1]) == list(range(1, 64, 2))
    assert r.report["calibration"]["passes"] == 2
    ids = text_windows(Checkpoint(folder), texts[1], LENGTH, 2).batches[0]
    pruned = T.LlamaForCausalLM.from_pretrained(tmp_path / "lasso", dtype=torch.float64).eval()
    with torch.no_grad():
        got, want = pruned(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())  # the least squares carries a 1e-6 ridge
