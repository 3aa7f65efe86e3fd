"""Bar plots of results rows (PNG, matplotlib's Agg canvas: no display, no pyplot global state).

    save_results_plot(rows, ["piqa", "arc_easy", "avg"], "runs/pipeline/pipeline.png", title="...")

A row is a dict such as {"method": "FP", "piqa": 68.0, "avg": 57.0, "wikitext2": 36.6}; accuracies
go on the left panel (grouped by task, one bar per method), WikiText-2 perplexity on the right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = names or {}
    acc_keys = [k for k in acc_keys if any(k in r for r in rows)]
    has_ppl = any(ppl_key in r for r in rows)
    if not acc_keys and not has_ppl:
        raise ValueError("nothing to plot: no row has an accuracy or perplexity")
    panels = [p for p, used in (("acc", acc_keys), ("ppl", has_ppl)) if used]
    widths = [max(len(acc_keys), 2) if p == "acc" else 1.2 for p in panels]
    fig = Figure(figsize=(2.2 + 1.3 * sum(widths), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        keys = acc_keys if panel == "acc" else [ppl_key]
        series = {r["method"]: [r.get(k) for k in keys] for r in rows}
        labels = [names.get(k, k) for k in keys]
        grouped_bars(ax, labels, series, "accuracy (%)" if panel == "acc" else "perplexity (lower is better)")
    axes[0].legend(fontsize=8, loc="upper left", ncol=len(rows))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
