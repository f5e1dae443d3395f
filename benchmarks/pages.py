"""How each benchmark's results become tables: one function per benchmark, from its ``results`` payload to
Markdown tables (``benchmarks/report.py`` adds the title, the description and what it was measured with).

A table here formats numbers; it never computes a claim the results file does not hold. A benchmark without
a renderer here is an error in ``report.py``, so a new results file cannot go unpublished.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

Rows = list[list[Any]]


def table(header: list[str], rows: Rows) -> str:
    """A Markdown table; None shows as a dash."""
    def cell(v: Any) -> str:
        return "-" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def pct(x: float | None, digits: int = 1) -> str | None:
    return None if x is None else f"{100 * x:.{digits}f}"


def ms(stat: dict[str, float], scale: float = 100, digits: int = 1) -> str:
    """A mean +- std over seeds ({"mean", "std"}), scaled (100: a fraction as percent)."""
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def spread(values: list[float], digits: int = 1) -> str:
    """min / median / max of repeated rounds."""
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def mega(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def headline(res: list[dict[str, Any]]) -> list[str]:
    rows = [[r["pass"], r["ratio"], f"{r['recovery']} ({r['recovery_epochs']})", pct(r["macs_kept"]),
             pct(r["params_kept"]), pct(r["acc_unpruned"]), pct(r.get("acc_trained_copy")), pct(r["acc_pruned"]),
             pct(r["acc_recovered"]), f"{r['seconds_total']:.0f}"] for r in res]
    return ["Accuracy in %, on the validation split; MACs and parameters kept in %. Latency is left out: at 8x8 "
            "images it is per-op overhead and one run's figure varies from run to run; [latency](latency.md) "
            "times real model sizes over repeated rounds.",
            table(["pass", "ratio", "recovery (epochs)", "MACs kept", "params kept", "unpruned",
                   "trained by the pass", "pruned", "recovered", "seconds"], rows)]


def methods(res: list[dict[str, Any]]) -> list[str]:
    rows = [[r["method"], r["ratio"], pct(r["acc"]), pct(r["acc_ft"]), pct(r["macs_kept"]), f"{r['seconds']:.1f}"]
            for r in res]
    return ["Accuracy in %; the unpruned row's fine-tuned accuracy is the same fine-tune on the dense model.",
            table(["method", "ratio", "accuracy, no recovery", "after fine-tune", "MACs kept %", "prune s"], rows)]


def recovery(res: dict[str, Any]) -> list[str]:
    full, rows = res["full"], res["rows"]
    out = []
    for r in rows:
        if r["distill"]:
            continue
        kd = next((k for k in rows if k["ratio"] == r["ratio"] and k["mode"] == r["mode"] and k["distill"]), None)
        out.append([r["ratio"], pct(r["macs"] / full["macs"], 0), r["mode"], r["epochs"], pct(r["accuracy"]),
                    pct(kd["accuracy"]) if kd else None,
                    f"{r['seconds']:.0f} ({kd['seconds']:.0f})" if kd else None])
    return [f"Unpruned: accuracy {pct(full['accuracy'])}%, {mega(full['macs'])} MACs, {mega(full['params'])} "
            f"parameters. Accuracy (%) after the last epoch, mean of seeds {res['seeds']}; fine-tune lr "
            f"{res['finetune_lr']:g}, scratch lr {res['lr']:g}, AdamW with a cosine schedule, {res['threads']} "
            "thread(s).",
            table(["ratio", "MACs kept %", "recovery", "epochs", "accuracy", "with KD", "s per run (KD)"], out)]


def scratch(res: list[dict[str, Any]]) -> list[str]:
    rows = [[r["method"], ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or None,
             r["recovery"], pct(r["macs_kept"]), pct(r.get("acc_pruned")), pct(r["acc"]),
             None if r["search_s"] is None else f"{r['search_s']:.1f}",
             None if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"] for r in res]
    return ["Accuracy in %; search s: the pass's own training (slimming's sparsity training, scratch's gates).",
            table(["method", "options", "recovery", "MACs kept %", "accuracy pruned", "accuracy recovered",
                   "search s", "recovery s"], rows)]


def sanp(res: dict[str, Any]) -> list[str]:
    out = []
    for target, rows in res["rows"].items():
        out.append(f"**Average-MACs target {target}** (mean ± std over {res['settings']['seeds']} seeds; "
                   "accuracy %, MACs as a fraction of the original's, batch-1 latency ms):")
        out.append(table(["row", "accuracy", "MACs", "latency ms"],
                         [[name, ms(t["accuracy"]), ms(t["macs"], 1, 3), ms(t["latency_ms"], 1, 3)]
                          for name, t in rows.items()]))
    scale = res.get("resnet18_scale_check")
    if scale:
        out.append(f"ResNet-18 scale check: {scale['gated_groups']} gated groups, average MACs "
                   f"{scale['average_macs']:.2f}, original graph {scale['original_graph_ms']:.1f} ms, dynamic "
                   f"{scale['dynamic_ms']:.1f} ms ({scale['speedup']:.2f}x).")
    return out


def tas(res: dict[str, Any]) -> list[str]:
    rows = [[name, ms(t["accuracy"]), ms(t["macs_kept"], 1, 3), ms(t["blocks_removed"], 1, 1),
             ms(t["seconds"], 1, 1), ms(t["missed_band"], 1, 2) if "missed_band" in t else None]
            for name, t in res["rows"].items()]
    return [f"Dense accuracy {pct(res['dense_accuracy'])}%. Mean ± std over {res['settings']['seeds']} seeds; "
            f"target MACs {res['settings']['target_macs']}. The authors: {res['authors']}.",
            table(["row", "accuracy %", "MACs kept", "blocks removed", "search s", "missed the band"], rows)]


def anp(res: dict[str, Any]) -> list[str]:
    p = res["pretrained"]
    rows = [[name, ms(t["clean_accuracy"]), ms(t["pgd_accuracy"]), ms(t["vulnerability"], 1, 4),
             ms(t["macs_kept"], 1, 2), ms(t["seconds"], 1, 1)] for name, t in res["rows"].items()]
    return [f"Pre-trained: clean {pct(p['clean_accuracy'])}%, PGD-40 {pct(p['pgd_accuracy'])}%, vulnerability "
            f"{p['vulnerability']:.4f}. Mean ± std over {res['settings']['seeds']} seeds, eps "
            f"{res['settings']['eps']}.",
            table(["row", "clean %", "PGD-40 %", "vulnerability", "MACs kept", "seconds"], rows)]


def flop(res: dict[str, Any]) -> list[str]:
    rows = [[r["model"], r["bpc"], r.get("bpc_before_finetune"), mega(r["params"]), r.get("kept"),
             r.get("expected_sparsity"), r.get("target_sparsity"), r["seconds"]] for r in res["rows"]]
    return ["Bits per character on the validation windows (lower is better); params of the whole model; seconds of "
            "the row's training and pruning. (The results file also holds one batch-1 latency per row, a single "
            "measurement, not shown.)",
            table(["model", "bpc", "bpc before fine-tune", "params", "kept", "expected sparsity",
                   "target sparsity", "seconds"], rows)]


def key_values(res: dict[str, Any], prefix: str = "") -> Rows:
    """A nested dict as (dotted key, value) rows; an empty dict shows as a dash."""
    rows: Rows = []
    for k, v in res.items():
        if isinstance(v, dict) and v:
            rows += key_values(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", None if v == {} else v])
    return rows


def measurements(res: dict[str, Any]) -> list[str]:
    """A benchmark that records one set of named measurements (meta_plan, hf_stream): one row each."""
    return [table(["measurement", "value"], key_values(res))]


def hf_folders(res: list[dict[str, Any]]) -> list[str]:
    rows = [[r["family"], r.get("loads"), r.get("max_abs_err"), r.get("params_kept"),
             ", ".join(f"{k} {a}→{b}" for k, (a, b) in (r.get("config_changes") or {}).items()) or None,
             r.get("error")] for r in res]
    return [table(["family", "loads", "max abs error", "params kept", "config changes", "error"], rows)]


def masks(res: dict[str, Any]) -> list[str]:
    rows = [[r["model"], r["prunable_groups"], r["trace_s"], r["analyze_s"], r["insert_s"],
             *(spread(r["step_rounds_s"][k], 3) for k in ("eager", "graph", "masked")),
             spread(r["masked_over_eager_rounds"], 2)] for r in res["rows"]]
    return ["Seconds. Trace, analyze and insert: one measurement each. A training step: min / median / max over "
            "interleaved rounds, each round the median of its steps; masked / eager per round.",
            table(["model", "groups", "trace", "analyze", "insert masks", "step eager", "step graph",
                   "step masked", "masked / eager"], rows)]


def latency(res: dict[str, Any]) -> list[str]:
    rows = [[r["model"], r["ratio"], r["batch"], r["size"], f"{mega(r['macs_before'])} → {mega(r['macs_after'])}",
             f"{mega(r['params_before'])} → {mega(r['params_after'])}",
             spread(r["latency_rounds_ms"]["original"]), spread(r["latency_rounds_ms"]["pruned"]),
             f"{r['speedup']:.2f}x"] for r in res["rows"]]
    return ["Latency in ms: min / median / max over interleaved rounds (each round the median of its repeats); "
            "the speed-up is the original's median over rounds divided by the pruned model's.",
            table(["model", "ratio", "batch", "size", "MACs", "params", "original ms", "pruned ms", "speed-up"],
                  rows)]


def zoo(res: dict[str, Any]) -> list[str]:
    from zoo import family_markdown, markdown  # noqa: PLC0415 - the zoo's own tables and totals

    head = f"l1 at ratio {res['ratio']}; one row per model."
    if {r["suite"] for r in res["runs"]} == {"timm-families"}:  # one model per family: the verdict table
        return [head + " One model per timm family: the smallest (`timm_families.json`, the zoo's cache).",
                family_markdown(res["runs"])]
    return [head, markdown(res["runs"])]


def _mean_std(values: list[float], scale: float = 100, digits: int = 1) -> str | None:
    """``ms`` of the mean and (population) standard deviation of ``values``; None without any."""
    return ms({"mean": statistics.fmean(values), "std": statistics.pstdev(values)}, scale, digits) if values else None


TRAINS_THEN_CUTS = ("slimming", "anp", "flop")  # methods_robustness: passes whose trained network is cut as it is


def methods_robustness(res: dict[str, Any]) -> list[str]:
    """One row per architecture and pass: mean +- std over seeds; the bar's verdicts counted per row."""
    bar, groups = res["bar"], {}
    for r in res["rows"]:
        groups.setdefault((r["arch"], r["row"]), []).append(r)
    rows, held, total, trained_held, trained_total = [], 0, 0, 0, 0
    for (arch, name), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        lm = arch == "charlm"
        sign = -1 if lm else 1  # the LM's first metric is -bpc: shown as bpc

        def vals(key: str, rs: list[dict[str, Any]] = ok, sign: int = sign) -> list[float]:
            return [sign * r[key] for r in rs if r.get(key) is not None]

        budget = sum(abs(r["kept"] - r["target"]) <= bar["budget"] + 1e-9 for r in ok)
        accurate = sum(r["final"] is not None and r["dense"] - r["final"] <= bar["accuracy"] + 1e-9 for r in ok)
        # the second bar: the network a pass trains and then cuts (not scratch's random weights, not tas's
        # searched architecture, which its recovery trains)
        cuts_trained = not lm and name in TRAINS_THEN_CUTS
        kept_trained = sum(r.get("trained") is not None and r["dense"] - r["trained"] <= bar["accuracy"] + 1e-9
                           for r in ok)
        if not lm:
            total += 1
            held += budget == accurate == len(rs)
        if cuts_trained:
            trained_total += 1
            trained_held += kept_trained == len(rs)
        scale, digits = (1, 3) if lm else (100, 1)
        drop = [sign * (r["final"] - r["dense"]) for r in ok if r["final"] is not None]
        pgd = _mean_std(vals("pgd_final")) if any("pgd_final" in r for r in ok) else None
        static = (f"{_mean_std(vals('static_final'))} at {_mean_std(vals('static_kept'), 100, 0)}"
                  if any("static_final" in r for r in ok) else None)
        errors = sorted({r["error"].strip().splitlines()[-1][:240] for r in rs if "error" in r})
        rows.append([arch, name, len(rs), _mean_std(vals("dense"), scale, digits),
                     _mean_std(vals("trained"), scale, digits), _mean_std(vals("pruned"), scale, digits),
                     _mean_std(vals("final"), scale, digits), _mean_std(drop, scale, digits),
                     _mean_std([r["kept"] for r in ok], 100, 1), f"{budget}/{len(rs)}",
                     f"{accurate}/{len(rs)}" if not lm else None,
                     f"{kept_trained}/{len(rs)}" if cuts_trained else None, sum(r.get("fit", False) for r in ok), pgd,
                     static,
                     f"{statistics.fmean(r['seconds'] for r in rs):.0f}",
                     "; ".join(errors) or None])
    state = "" if res.get("complete", True) else " The run is not complete: rows may have fewer seeds."
    return [f"Mean ± std over seeds. Accuracy in % on the validation split (the character LM: bits per byte, lower "
            f"is better); kept: the fraction of the dense model's MACs (flop: parameters; sanp: average MACs per "
            f"sample of its per-sample module) measured on the result. The bar: kept within "
            f"{bar['budget']:g} of the target on every run, final accuracy at most {100 * bar['accuracy']:g} "
            f"points below the dense model's. {held} of {total} image rows hold both on every seed.{state} "
            f"The second bar, for the passes that train the network they then cut ({', '.join(TRAINS_THEN_CUTS)}): "
            f"that trained network at most {100 * bar['accuracy']:g} points below the dense model; "
            f"{trained_held} of {trained_total} image rows hold it on every seed. "
            f"\"Trained by the pass\": the network the pass trained, before the cut (scratch's is its random weights "
            f"with learned gates, near chance by design; tas's the argmax of its search, before its recovery "
            f"fine-tunes it); "
            f"\"pruned\": the compacted model before recovery. A run that ends in an error counts against both bars, "
            f"and its message is in the last column (sanp refuses a target its per-sample gates cannot reach).",
            table(["model", "pass", "runs", "dense", "trained by the pass", "pruned", "final", "final - dense",
                   "kept %", "on budget", "within 2 points", "trained within 2 points", "budget fit ran",
                   "PGD accuracy", "sanp static: accuracy at kept %", "seconds", "errors"], rows)]


def detection(res: list[dict[str, Any]]) -> list[str]:
    def maps(m: dict[str, float] | None) -> str | None:
        return None if not m else f"{m['map_50']:.1f} / {m['map']:.1f}"

    controls = {r["control_epochs"]: r for r in res if "control_epochs" in r}

    def against_control(r: dict[str, Any]) -> str | None:
        c = controls.get(r.get("epochs_in_all"))
        return None if c is None else f"{r['final']['map_50'] - c['final']['map_50']:+.1f}"

    widths = [r for r in res if "width" in r]
    runs = [r for r in res if "control_epochs" not in r and "width" not in r]
    rows = [[f"examples/{r.get('example', 'yolo')}.py", r["pass"], " ".join(f"{k}={v}" for k, v in
                                                                        (r.get("options") or {}).items()) or None,
             r["ratio"], r["compaction"], f"{r['recovery']} ({r['recovery_epochs']})", pct(r["macs_kept"]),
             pct(r["params_kept"]), maps(r["dense"]), maps(r["trained"]), maps(r["pruned"]), maps(r["final"]),
             f"{r['final']['map_50'] - r['dense']['map_50']:+.1f}", against_control(r),
             r.get("epochs_in_all"), f"{r['seconds_total']:.0f}"] for r in runs]
    rows += [[f"examples/{c['example']}.py", c["pass"], None, None, None, None, None, None, None, None, None,
              maps(c["final"]), None, None, c["control_epochs"], f"{c['seconds_total']:.0f}"]
             for c in controls.values()]
    rows += [[f"examples/{w['example']}.py", w["pass"], None, None, None, None, pct(w["macs_kept"]), None, None, None,
              None, maps(w["final"]), None, None, None, f"{w['seconds_total']:.0f}"] for w in widths]
    return ["mAP@0.5 / mAP@0.5:0.95 in %, on the validation images (torchmetrics' MeanAveragePrecision); MACs and "
            "parameters kept in %. \"trained by the pass\": slimming's sparsity-trained copy of the modules, before "
            "the cut; \"pruned\": the resized model before recovery. \"epochs in all\": passes over the training "
            "images the model saw (the example's own training, the pass's, the recovery's); \"dense, trained as "
            "long\": the example's dense model trained that many passes by its own recipe, the control for a pruned "
            "model that only ends higher because it trained longer; \"dense, width W\": the same network built W wide "
            "(the example's is 8) and trained in full by `model()`, what that many MACs reach on the task without "
            "pruning. Seconds: the whole `fxprune run`, the example's "
            "own training in `model()` included.",
            table(["model file", "pass", "--opt", "ratio", "compaction", "recovery (epochs)", "MACs kept",
                   "params kept", "dense", "trained by the pass", "pruned", "final", "final - dense (mAP@0.5)",
                   "final - dense trained as long", "epochs in all", "seconds"], rows)]


def lm_folders(res: dict[str, Any]) -> list[str]:
    """Part 1 (quality, ``rows``) or part 2 (memory, ``runs``) of benchmarks/lm_folders.py."""
    return lm_memory(res) if "runs" in res else lm_quality(res)


def lm_quality(res: dict[str, Any]) -> list[str]:
    dense = next(r for r in res["rows"] if r["method"] == "dense")
    dense_rec = (dense.get("recovered") or dense)["perplexity"]  # recovered rows compare with the dense model

    def row(r: dict[str, Any]) -> list[Any]:
        kept = r["params_after"] / r["params_before"] if r.get("params_before") else 1.0
        rec = r.get("recovered") or {}
        return [r["method"], r["removed"], pct(kept), f"{r['perplexity']:.3f}",
                f"{(r['perplexity'] / dense['perplexity'] - 1) * 100:+.1f}%" if r is not dense else None,
                f"{rec['perplexity']:.3f}" if rec else None,
                f"{(rec['perplexity'] / dense_rec - 1) * 100:+.1f}%" if rec and r is not dense else None,
                f"{r['bits_per_byte']:.4f}", ", ".join(map(str, r["removed_blocks"])) if r.get("removed_blocks")
                else None, f"{r['prune_seconds']:.1f}" if r.get("prune_seconds") else None]

    cfg = res["config"]
    return [f"The dense model: LLaMA architecture, {cfg['num_hidden_layers']} blocks, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} key/value), MLP "
            f"{cfg['intermediate_size']}, bytes as tokens; trained {res['steps']} steps of {res['batch']} x "
            f"{res['seq']} bytes in {res['train_seconds']:.0f} s (last 20 steps' loss {res['final_train_loss']:.3f} "
            f"nats). Perplexity per byte on {res['eval_bytes']:,} held-out bytes (windows of {res['seq']}); "
            f"calibration: {res['calibration']['windows']} windows of {res['calibration']['length']} bytes of the "
            "training text. Recovered: the pruned folder (and, on the dense row, the dense model itself: the "
            "reference) after a distillation from the dense model of "
            f"{res.get('recovery_steps', 0)} steps (AdamW at {res.get('recovery_lr', 0):g}, {res['batch']} x "
            f"{res['seq']} bytes a step; bits per byte are before recovery). Seconds: the whole `fxprune run` (a child "
            "process, imports included).",
            table(["method", "removed", "params kept", "perplexity", "vs dense", "recovered", "vs dense recovered",
                   "bits per byte", "blocks removed", "seconds"], [row(r) for r in res["rows"]])]


def lm_memory(res: dict[str, Any]) -> list[str]:
    def row(r: dict[str, Any]) -> list[Any]:
        held = max(r["layer_fp32_mb"], r.get("embedding_stored_mb", 0.0))
        bound = r["imports_mb"] + held + r["activations_mb"] + r["shard_mb"]
        cal = r.get("calibration") or {}
        return [r["layers"], f"{r['parameters_billion']:.2f}", f"{r['bytes'] / 2**30:.2f}", f"{r['shard_mb']:.0f}",
                f"{r['peak_mb']:.0f}", f"{r['imports_mb']:.0f}", f"{r['layer_fp32_mb']:.0f}",
                f"{r.get('embedding_stored_mb', float('nan')):.0f}", f"{r['activations_mb']:.0f}", f"{bound:.0f}",
                "yes" if r["peak_mb"] <= bound else "**no**", f"{cal.get('seconds', float('nan')):.1f}",
                f"{cal.get('seconds', float('nan')) / r['layers']:.2f}", f"{r['seconds']:.0f}"]

    return [f"MB (2^20 bytes); widths: {res.get('shape', 'tinyllama')}. `fxprune run DIR --pass act --ratio 0.25 "
            f"--calib` with {res['windows']} calibration windows of {res['seq']} tokens, in a child process: its peak "
            "resident memory against the bound imports + the larger of one decoder layer (float32, the compute "
            "dtype for a bf16 checkpoint on the CPU) and the embedding table as stored + the calibration activations "
            "(every window's hidden states in and out of a layer, and one batch's largest intermediates inside it) + "
            "one shard. Calibration seconds: the streamed pass over the text (reading each layer's tensors from the "
            "shards included).",
            table(["layers", "params (B)", "checkpoint GiB", "largest shard", "peak", "imports", "one layer",
                   "embedding (stored)", "activations", "bound", "peak <= bound", "calibration s", "s per layer",
                   "run s"], [row(r) for r in res["runs"]])]


def lm_experts(res: dict[str, Any]) -> list[str]:
    """benchmarks/lm_experts.py: the experts pass against its controls, on a trained mixture-of-experts model."""
    dense = next(r for r in res["rows"] if r["method"] == "dense")

    def row(r: dict[str, Any]) -> list[Any]:
        kept = r["params_after"] / r["params_before"] if r.get("params_before") else 1.0
        seeds = r.get("perplexity_per_seed")
        return [r["method"], r["removed"], pct(kept), f"{r['perplexity']:.3f}",
                f"{(r['perplexity'] / dense['perplexity'] - 1) * 100:+.1f}%" if r is not dense else None,
                ", ".join(f"{p:.3f}" for p in seeds) if seeds else None, f"{r['bits_per_byte']:.4f}",
                f"{r['prune_seconds']:.1f}" if r.get("prune_seconds") else None]

    cfg = res["config"]
    first = next((r for r in res["rows"] if r.get("picks")), None)
    share = None
    if first is not None:
        picks = [sorted(v) for v in first["picks"].values()]
        share = ", ".join(f"{min(p) / sum(p):.1%}-{max(p) / sum(p):.1%}" for p in picks)
    return [f"The dense model: Mixtral architecture, {cfg['num_hidden_layers']} blocks, hidden {cfg['hidden_size']}, "
            f"{cfg['num_local_experts']} experts of width {cfg['intermediate_size']} per block "
            f"({cfg['num_experts_per_tok']} picked per token), bytes as tokens; trained {res['steps']} steps of "
            f"{res['batch']} x {res['seq']} bytes in {res['train_seconds']:.0f} s (last 20 steps' loss "
            f"{res['final_train_loss']:.3f} nats, the load-balancing term included). Perplexity per byte on "
            f"{res['eval_bytes']:,} held-out bytes (windows of {res['seq']}); calibration: "
            f"{res['calibration']['windows']} windows of {res['calibration']['length']} bytes of the training text"
            + (f"; each expert's share of the router's picks on it, per block (least-most): {share}" if share else "")
            + ". Seconds: the whole `fxprune run` (a child process, imports included). No recovery.",
            table(["method", "removed", "params kept", "perplexity", "vs dense", "per seed", "bits per byte",
                   "seconds"], [row(r) for r in res["rows"]])]


RENDERERS: dict[str, Callable[[Any], list[str]]] = {
    "headline": headline, "methods": methods, "recovery": recovery, "scratch": scratch, "sanp": sanp, "tas": tas,
    "anp": anp, "flop": flop, "meta_plan": measurements, "hf_stream": measurements, "hf_folders": hf_folders,
    "masks": masks, "latency": latency, "zoo": zoo, "methods_robustness": methods_robustness, "detection": detection,
    "lm_folders": lm_folders, "lm_experts": lm_experts,
}
