"""The run report: one dict (report.json), its Markdown rendering (report.md) and a channel chart (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["group_rows", "layer_rows", "pass_report", "render_markdown", "plot_channels", "plot_blocks",
           "plot_histogram", "cost_rows", "human", "format_ms"]

HISTOGRAM_BINS = 40


def group_rows(result: Any) -> list[dict[str, Any]]:
    """Kept/total channels of every prunable group, with the layers that produce and consume it."""
    by_id = {r["group"]: r for r in result.groups.rows()}
    return [{**s, "consumers": by_id[s["group"]]["consumers"], "block": by_id[s["group"]]["block"]}
            for s in result.summary()]


def layer_rows(result: Any) -> list[dict[str, Any]]:
    """MACs per layer before and after (on the example inputs), largest first."""
    from fxprune.selection.cost import CostCounter

    counter = CostCounter(result.groups)
    before, after = counter.per_layer(), counter.per_layer(result.removed)
    rows = [{"layer": name, "macs_before": macs, "macs_after": after.get(name, 0)} for name, macs in before.items()]
    return sorted(rows, key=lambda r: -r["macs_before"])


def _binned(hist: dict[str, Any]) -> dict[str, Any]:
    """A pass's raw histogram values as shared bin edges and counts (report.json stays small)."""
    import numpy as np

    series = {k: np.asarray(v, dtype=float) for k, v in hist.items() if k in ("before", "after")}
    edges = _edges(*series.values())
    out = {k: v for k, v in hist.items() if k not in series}
    out["edges"] = edges.tolist()
    out.update({k: np.histogram(v, edges)[0].tolist() for k, v in series.items()})
    return out


def _edges(*series: Any) -> Any:
    """HISTOGRAM_BINS equal bins from 0 to the largest value of any series (shared, so counts compare)."""
    import numpy as np

    top = max([float(np.max(v, initial=0.0)) for v in series] + [1e-12])
    return np.linspace(0.0, top, HISTOGRAM_BINS + 1)


def pass_report(report: dict[str, Any]) -> dict[str, Any]:
    """What the pass reported, for report.json: histograms as bin edges and counts."""
    out = {k: v for k, v in report.items() if k != "histograms"}
    if report.get("histograms"):
        out["histograms"] = {name: _binned(h) for name, h in report["histograms"].items()}
    return out


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}{unit}"
    return f"{n:.4g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.2f}x"


def cost_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, change) for MACs, params, latency, then every metric of evaluate().

    Costs change as a ratio; metrics as a difference. When the run fine-tuned, each metric also gets a
    row for the pruned model before fine-tuning.
    """
    b, a = report["before"], report["after"]
    rows = [("MACs", human(b["macs"]), human(a["macs"]), _ratio(b["macs"], a["macs"])),
            ("params", human(b["params"]), human(a["params"]), _ratio(b["params"], a["params"])),
            ("latency (ms)", format_ms(b["latency_ms"]), format_ms(a["latency_ms"]),
             _ratio(b["latency_ms"], a["latency_ms"]))]
    pruned = report.get("pruned", {}).get("metrics") or {}
    trained = (report.get("pass_report") or {}).get("trained_metrics") or {}
    for name, value in (b.get("metrics") or {}).items():
        if name in trained:  # the network the pass trained (slimming's sparse copy, scratch's gated one)
            rows.append((f"{name} (trained by the pass, before pruning)", _fmt(value), _fmt(trained[name]),
                         _diff(value, trained[name])))
        if report["finetune"]["epochs"] and name in pruned:
            rows.append((f"{name} (pruned, not fine-tuned)", _fmt(value), _fmt(pruned[name]),
                         _diff(value, pruned[name])))
        after = (a.get("metrics") or {}).get(name)
        rows.append((name, _fmt(value), _fmt(after), _diff(value, after)))
    rows += _dynamic_rows(report)
    rb, ra = b.get("robustness") or {}, a.get("robustness") or {}
    attack = report.get("attack") or {}
    for key, label in (("clean_accuracy", "clean accuracy (attack's data)"),
                       ("pgd_accuracy", f"PGD accuracy (eps {attack.get('eps', 0):g}, {attack.get('steps', 0)} steps)"),
                       ("vulnerability", "vulnerability (mean |f(x) - f(x_adv)|)")):
        if key in rb or key in ra:
            rows.append((label, _fmt(rb.get(key)), _fmt(ra.get(key)), _diff(rb.get(key), ra.get(key))))
    return rows


def _dynamic_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """A dynamic module's own rows (sanp's dynamic/): average MACs per sample, its metrics, batch-1 latency."""
    p = report.get("pass_report") or {}
    if "average_macs" not in p:
        return []
    b = report["before"]
    rows = [("MACs per sample, dynamic/ (average)", human(b["macs"]), human(p["average_macs"] * b["macs"]),
             f"{p['average_macs']:.2f}x")]
    for name, value in (p.get("dynamic_metrics") or {}).items():
        before = (b.get("metrics") or {}).get(name)
        rows.append((f"{name}, dynamic/", _fmt(before), _fmt(value), _diff(before, value)))
    lat = p.get("latency_ms_batch1") or {}
    if "dynamic" in lat and "original graph" in lat:
        rows.append(("batch-1 latency (ms), dynamic/ vs traced original", format_ms(lat["original graph"]),
                     format_ms(lat["dynamic"]), _ratio(lat["original graph"], lat["dynamic"])))
    return rows


def format_ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _diff(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{after - before:+.3g}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _table(head: list[str], rows: list[list[str]] | list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what was run, cost and metrics before/after, kept/total per group, training log."""
    lines = [f"# fxprune report: {Path(report['model_file']).name}", "",
             f"pass `{report['pass']}`, ratio {report['ratio']}, options {report['options'] or '{}'}, "
             f"recovery {report['finetune'].get('mode', 'finetune')}"
             f"{' + distillation' if report['finetune'].get('distill') else ''} for {report['finetune']['epochs']} "
             f"epochs, device {report['device']}", ""]
    if (report.get("compaction") or {}).get("target") == "modules":
        lines += [f"Compacted by resizing the model's own modules: {report['compaction']['why']}. The output folder "
                  "holds model.safetensors and plan.json (no model.pt2): `fxprune.load(DIR, model=model())` "
                  "rebuilds it.", ""]
    lines += [f"Costs of one forward pass on example_inputs {report['example_inputs']}; metrics from evaluate().", ""]
    lines += _table(["", "before", "after", "change"], cost_rows(report)) + [""]
    lines += [f"## Channel groups ({len(report['groups'])} prunable, {report['frozen_groups']} frozen)", ""]
    if report.get("base"):
        lines += [f"The pass pruned a model it built ({human(report['base']['params'])} parameters, e.g. scratch's "
                  "wider copy): totals below and plan.json refer to that model, not to the original.", ""]
    lines += _table(["group", "kept / total", "producers", "consumers"],
                    [[g["group"], f"{g['kept']} / {g['total']}", ", ".join(g["producers"]) or "-",
                      ", ".join(g["consumers"]) or "-"] for g in report["groups"]]) + [""]
    if report.get("layers"):
        lines += ["## MACs per layer", ""]
        lines += _table(["layer", "MACs before", "MACs after", "kept"],
                        [[r["layer"], human(r["macs_before"]), human(r["macs_after"]),
                          f"{r['macs_after'] / r['macs_before']:.0%}" if r["macs_before"] else "-"]
                         for r in report["layers"]]) + [""]
    sparsity = (report.get("pass_report") or {}).get("sparsity")
    if sparsity:
        lines += ["## Sparsity training", "",
                  f"Schedule `{sparsity['schedule']}`; threshold {sparsity['threshold']:.3g}; scales below it: "
                  f"{sparsity['fraction_below_before']:.1%} before, {sparsity['fraction_below_after']:.1%} after "
                  f"sparsity training; every selected channel below it: "
                  f"{'yes' if sparsity['selected_below_threshold'] else 'no'}. Histogram: "
                  + ", ".join(f"`{k}_histogram.png`" for k in report["pass_report"].get("histograms", {})), ""]
    stages = (report.get("pass_report") or {}).get("stages")
    if stages:
        lines += ["## Residual stages (depth search; chart: blocks.png)", ""]
        lines += _table(["stage", "blocks kept / total", "removed"],
                        [[k, f"{v['kept']} / {v['blocks']}", ", ".join(v["removed"]) or "-"]
                         for k, v in stages.items()]) + [""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if report["finetune"]["log"]:
        lines += ["## Recovery training (curve: training.png, log: train_log.jsonl)", ""]
        lines += _table(["epoch", "loss", "lr", "seconds"],
                        [[r["epoch"], f"{r['loss']:.4f}", f"{r['lr']:.3g}", f"{r['seconds']:.1f}"]
                         for r in report["finetune"]["log"]]) + [""]
    return "\n".join(lines) + "\n"


def _label(group: dict[str, Any]) -> str:
    names = group["producers"] or group["consumers"]
    text = ", ".join(names) if names else f"group {group['group']}"
    return text if len(text) <= 40 else text[:37] + "..."


def _kept_bars(labels: list[str], totals: list[int], kept: list[int], path: Path, title: str, xlabel: str,
               row_height: float, fontsize: int | None = None) -> None:
    """Horizontal bars, one per row, first row on top: the total in grey, the kept part in colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + row_height * max(len(labels), 1)))
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, totals, color="#d0d0d0", label="total")
    ax.barh(ys, kept, color="#2b7bba", label="kept")
    ax.set_yticks(ys, labels, fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_blocks(stages: dict[str, dict[str, Any]], path: Path, title: str = "residual blocks kept per stage") -> None:
    """One bar per residual stage: its blocks in grey, the kept ones in colour."""
    _kept_bars(list(stages), [v["blocks"] for v in stages.values()], [v["kept"] for v in stages.values()], path,
               title, "residual blocks", 0.4)


def plot_channels(groups: list[dict[str, Any]], path: Path, title: str = "channels kept per group") -> None:
    """Horizontal bars per prunable group (labelled by its producing layers): total in grey, kept in colour."""
    _kept_bars([_label(g) for g in groups], [g["total"] for g in groups], [g["kept"] for g in groups], path, title,
               "channels", 0.28, fontsize=8)


def plot_histogram(hist: dict[str, Any], path: Path, title: str) -> None:
    """The values a pass reported before and after its training (slimming: |gamma|), threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    before, after = np.asarray(hist["before"], float), np.asarray(hist["after"], float)
    edges = _edges(before, after)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    for ax, values, label in ((axes[0], before, "before"), (axes[1], after, "after")):
        ax.hist(values, edges, color="#2b7bba")
        if "threshold" in hist:
            ax.axvline(hist["threshold"], color="#d62728", linestyle="--", label=f"threshold {hist['threshold']:.3g}")
            ax.legend(fontsize=8)
        ax.set_title(f"{label} ({len(values)} values)", fontsize=9)
        ax.set_xlabel(hist.get("xlabel", "value"), fontsize=8)
    axes[0].set_ylabel("count")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
