"""The run report: one dict (report.json), its Markdown rendering (report.md) and a channel chart (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["group_rows", "render_markdown", "plot_channels", "cost_rows", "human", "format_ms"]


def group_rows(result: Any) -> list[dict[str, Any]]:
    """Kept/total channels of every prunable group, with the layers that produce and consume it."""
    by_id = {r["group"]: r for r in result.groups.rows()}
    return [{**s, "consumers": by_id[s["group"]]["consumers"], "block": by_id[s["group"]]["block"]}
            for s in result.summary()]


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
            ("latency (ms)", format_ms(b["latency_ms"]), format_ms(a["latency_ms"]), _ratio(b["latency_ms"], a["latency_ms"]))]
    pruned = report.get("pruned", {}).get("metrics") or {}
    for name, value in (b.get("metrics") or {}).items():
        if report["finetune"]["epochs"] and name in pruned:
            rows.append((f"{name} (pruned, not fine-tuned)", _fmt(value), _fmt(pruned[name]), _diff(value, pruned[name])))
        after = (a.get("metrics") or {}).get(name)
        rows.append((name, _fmt(value), _fmt(after), _diff(value, after)))
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
    lines += [f"Costs of one forward pass on example_inputs {report['example_inputs']}; metrics from evaluate().", ""]
    lines += _table(["", "before", "after", "change"], cost_rows(report)) + [""]
    lines += [f"## Channel groups ({len(report['groups'])} prunable, {report['frozen_groups']} frozen)", ""]
    if report.get("base"):
        lines += [f"The pass pruned a model it built ({human(report['base']['params'])} parameters, e.g. scratch's "
                  "wider copy): totals below and plan.json refer to that model, not to the original.", ""]
    lines += _table(["group", "kept / total", "producers", "consumers"],
                    [[g["group"], f"{g['kept']} / {g['total']}", ", ".join(g["producers"]) or "-",
                      ", ".join(g["consumers"]) or "-"] for g in report["groups"]]) + [""]
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


def plot_channels(groups: list[dict[str, Any]], path: Path, title: str = "channels kept per group") -> None:
    """Horizontal bars per prunable group (labelled by its producing layers): total in grey, kept in colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    n = max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * n))
    ys = list(range(len(groups)))[::-1]
    ax.barh(ys, [g["total"] for g in groups], color="#d0d0d0", label="total")
    ax.barh(ys, [g["kept"] for g in groups], color="#2b7bba", label="kept")
    ax.set_yticks(ys, [_label(g) for g in groups], fontsize=8)
    ax.set_xlabel("channels")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
