"""Bar plots of results rows (PNG, matplotlib's Agg canvas: no display, no pyplot global state).

    save_results_plot(rows, ["piqa", "arc_easy", "avg"], "runs/pipeline/pipeline.png", title="...")

A row is a dict such as {"method": "FP", "piqa": 68.0, "avg": 57.0, "wikitext2": 36.6}; accuracies
go on the left panel (grouped by task, one bar per method), WikiText-2 perplexity on the right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from quant.errors import UserError
from utils.io import read_jsonl

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def _figure(figsize):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def grouped_bars(ax, categories: Sequence[str], series: dict, ylabel: str) -> None:
    """One group of bars per category, one bar per series (label -> values, None = no bar)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=label,
                      color=COLORS[i % len(COLORS)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.18)  # room above the bars for the labels and the legend
    ax.grid(axis="y", alpha=0.3)


def save_results_plot(rows: list, acc_keys: Sequence[str], path, title: str,
                      names: Optional[dict] = None, ppl_key: str = "wikitext2") -> Path:
    """Accuracy (%) per task and, if any row has it, `ppl_key` perplexity, as one PNG.

    Raises:
        ValueError: no row has any of the keys (nothing to plot).
    """
    names = names or {}
    acc_keys = [k for k in acc_keys if any(k in r for r in rows)]
    has_ppl = any(ppl_key in r for r in rows)
    if not acc_keys and not has_ppl:
        raise UserError("nothing to plot: no row has an accuracy or perplexity")
    panels = [p for p, used in (("acc", acc_keys), ("ppl", has_ppl)) if used]
    widths = [max(len(acc_keys), 2) if p == "acc" else 1.2 for p in panels]
    fig = _figure((2.2 + 1.3 * sum(widths), 4.2))
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        keys = acc_keys if panel == "acc" else [ppl_key]
        series = {r["method"]: [r.get(k) for k in keys] for r in rows}
        labels = [names.get(k, k) for k in keys]
        grouped_bars(ax, labels, series, "accuracy (%)" if panel == "acc" else "perplexity (lower is better)")
    axes[0].legend(fontsize=8, loc="upper left", ncol=len(rows))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_recovered_plot(rows: list, path, title: str, key: str = "recovered_ppl") -> Path:
    """Recovered % of the FP -> RTN gap (`key`, as recipes.table.add_recovered writes it) per W-A-KV
    setting, one bar per method (QAT, SmoothQuant, GPTQ), as one PNG. 100 % = FP, 0 % = RTN.

    Raises:
        ValueError: no row has `key`.
    """
    kept = [r for r in rows if key in r]
    if not kept:
        raise UserError(f"nothing to plot: no row has {key!r}")
    settings = list(dict.fromkeys(r["setting"] for r in kept))
    values = {(r["method"].split(" (")[0], r["setting"]): r[key] for r in kept}  # "QAT (w4a8kv8)" -> QAT
    methods = list(dict.fromkeys(m for m, _ in values))
    series = {m: [values.get((m, s)) for s in settings] for m in methods}
    fig = _figure((2.5 + 1.1 * len(settings), 4.2))
    ax = fig.subplots()
    grouped_bars(ax, settings, series, "recovered % of the FP -> RTN gap")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(100, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("W-A-KV")
    ax.legend(fontsize=8, loc="upper left", ncol=len(methods))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def save_training_curve(metrics_jsonl, path, title: str = "QAT-KD training") -> Path:
    """Training loss (per logging step) and held-out KD loss (per eval step) from a run's
    `metrics.jsonl` (written by recipes/train.py), as one PNG.

    Raises:
        ValueError: the file holds no loss at all.
    """
    rows = read_jsonl(metrics_jsonl)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_kd_loss"]) for r in rows if "val_kd_loss" in r]
    if not train and not val:
        raise UserError(f"{metrics_jsonl}: no 'loss' or 'val_kd_loss' records to plot")
    fig = _figure((6, 3.6))
    ax = fig.subplots()
    for points, label, style in ((train, "train loss", "-"), (val, "held-out KD loss", "o--")):
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(teacher || student) per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def save_training_curves(runs: dict, path, title: str, key: str = "val_kd_loss") -> Path:
    """One line per run (label -> its `metrics.jsonl`) of `key` against the optimizer step, as one PNG
    (e.g. the held-out KD loss of every W-A-KV setting of the grid). Runs without `key` are left out.

    Raises:
        ValueError: no run has any `key` record.
    """
    fig = _figure((6.4, 4))
    ax = fig.subplots()
    drawn = 0
    for i, (label, metrics) in enumerate(runs.items()):
        points = [(r["step"], r[key]) for r in read_jsonl(metrics) if key in r]
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], "o-", label=label, color=COLORS[i % len(COLORS)])
            drawn += 1
    if not drawn:
        raise UserError(f"no run has {key!r} records: {list(runs.values())}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def main(argv) -> int:
    """python -m utils.plots curve METRICS_JSONL OUT.png [title]
                            | curves OUT.png LABEL=METRICS_JSONL [LABEL=METRICS_JSONL ...]
                            | table TABLE_JSON OUT.png [title] | recovered TABLE_JSON OUT.png [title]"""
    if len(argv) < 3 or argv[0] not in ("curve", "curves", "table", "recovered"):
        print(main.__doc__)
        return 2
    if argv[0] == "curves":
        runs = dict(arg.split("=", 1) for arg in argv[2:])
        print(save_training_curves(runs, argv[1], "held-out KD loss per W-A-KV setting"))
        return 0
    kind, src, out, title = argv[0], argv[1], argv[2], " ".join(argv[3:])
    if kind == "curve":
        save_training_curve(src, out, title or "QAT-KD training")
    elif kind == "recovered":
        save_recovered_plot(json.loads(Path(src).read_text()), out, title or "recovered % of the FP -> RTN gap")
    else:
        rows = json.loads(Path(src).read_text())
        for r in rows:
            r["method"] = f"{r['method']} {r.get('setting', '')}".strip()
        acc = [k for k in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                           "openbookqa", "avg") if any(k in r for r in rows)]
        save_results_plot(rows, acc, out, title or src)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
