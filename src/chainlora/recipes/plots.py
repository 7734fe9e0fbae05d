"""Every plot chainlora draws, as PNG files written atomically.

plot_loss(path, ...)                   a run's loss curve: train loss per step, dev loss, knots (``train``)
plot_main(results, group, path)        test score by task and method, ±1 sd                 (``report``)
plot_chain_length(results, group, ...) test score against chain length, one panel per task  (``report``)
plot_stepdown(results, group, path)    rank step-down: score and training FLOPs saved vs LoRA (``report``)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chainlora.io import atomic_path
from chainlora.recipes.results import (
    Group,
    SweepResults,
    Variant,
    group_label,
    lora_baseline,
    variant_label,
    variant_order,
)
from chainlora.recipes.stats import mean_std


def plot_loss(
    path: str | Path,
    train_loss: Sequence[tuple[int, float]],
    *,
    dev_loss: Sequence[tuple[int, float]] = (),
    knots: Sequence[int] = (),
    title: str = "",
) -> Path:
    """Write ``path`` (PNG, atomically): ``train_loss`` and ``dev_loss`` as (step, loss) pairs, a dashed
    vertical line after each knot step (where a link was merged and the next one started)."""
    fig = Figure(figsize=(7, 4), dpi=120)  # the Agg canvas directly: no pyplot state, no display needed
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_loss:
        steps, losses = zip(*train_loss, strict=True)
        ax.plot(steps, losses, label="train loss", lw=1.2)
    if dev_loss:
        steps, losses = zip(*dev_loss, strict=True)
        ax.plot(steps, losses, "o-", label="dev loss", lw=1.2, ms=4)
    for i, step in enumerate(knots):
        ax.axvline(step, color="tab:red", ls="--", lw=1, label="knot" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train_loss or dev_loss or knots:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_main(results: SweepResults, group: Group, path: Path) -> Path:
    """Grouped bars: test score per task and method, error bars ±1 sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results.variants(group)
    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in variants)]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(tasks) + 2), 4.0), dpi=120)
    try:
        for i, v in enumerate(variants):
            xs, ms, sds = [], [], []
            for j, t in enumerate(tasks):
                s = results.stats(t, v, group)
                if s is not None:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ms.append(s.mean)
                    sds.append(s.std or 0.0)
            ax.bar(xs, ms, width, yerr=sds, capsize=2, label=variant_label(v))
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylabel("test score (mean ± 1 sd)")
        lows = [s.mean - (s.std or 0) for t in tasks for v in variants if (s := results.stats(t, v, group))]
        if lows:
            ax.set_ylim(max(0.0, min(lows) - 5), None)
        ax.legend(fontsize=7, ncol=min(4, len(variants)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"Test score by method ({group_label(group)})", fontsize=9)
        fig.tight_layout()
        _savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_chain_length(results: SweepResults, group: Group, variants: list[Variant], path: Path) -> Path:
    """Test score against chain length, one panel per task: mean line, ±1 sd band, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in variants)]
    cols = min(4, len(tasks)) or 1
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=120, squeeze=False)
    try:
        for ax, t in zip(axes.flat, tasks, strict=False):
            xs, means, lo, hi = [], [], [], []
            for v in variants:
                sel = results.selected.get((t, v, group))
                scores = [s * results.scale for s in sel.test_scores().values()] if sel else []
                if not scores:
                    continue
                m, sd = mean_std(scores)
                xs.append(v[1])
                means.append(m)
                lo.append(m - (sd or 0.0))
                hi.append(m + (sd or 0.0))
                ax.scatter([v[1]] * len(scores), scores, s=10, color="gray", alpha=0.6, zorder=3)
            ax.plot(xs, means, "o-", color="tab:blue", lw=1.5, zorder=4)
            ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, lw=0)
            ax.set_title(t, fontsize=10)
            ax.set_xticks(xs)
            ax.set_xlabel("chain length (1 = LoRA)", fontsize=8)
            ax.set_ylabel("test score", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks) :]:
            ax.axis("off")
        fig.suptitle(f"Test score vs chain length (mean ± 1 sd over seeds; {group_label(group)})", fontsize=9)
        fig.tight_layout()
        _savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_stepdown(results: SweepResults, group: Group, path: Path) -> Path:
    """Left: score per rank schedule and task; right: train FLOPs saved vs LoRA of the same first rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results.stepdown_variants(group)
    variants = results.variants(group)
    rows = sorted({b for v in steps if (b := lora_baseline(v, variants))} | set(steps), key=variant_order)
    tasks = [t for t in results.tasks if any((t, v, group) in results.selected for v in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    try:
        width = 0.8 / max(1, len(tasks))
        labels = [variant_label(v) for v in rows]
        for j, t in enumerate(tasks):
            xs, ms, sds, saved_x, saved = [], [], [], [], []
            for i, v in enumerate(rows):
                s = results.stats(t, v, group)
                x = i + (j - (len(tasks) - 1) / 2) * width
                if s is not None:
                    xs.append(x)
                    ms.append(s.mean)
                    sds.append(s.std or 0.0)
                base = lora_baseline(v, variants)
                f, fb = results.flops(t, v, group), results.flops(t, base, group) if base else None
                if f and fb:
                    saved_x.append(x)
                    saved.append(100 * (1 - f / fb))
            ax1.bar(xs, ms, width, yerr=sds, capsize=2, label=t)
            ax2.bar(saved_x, saved, width, label=t)
        for ax in (ax1, ax2):
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, fontsize=7, rotation=20)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        ax1.set_ylabel("test score (mean ± 1 sd)")
        ax2.set_ylabel("train FLOPs saved vs LoRA (%)")
        fig.suptitle(f"Rank step-down ({group_label(group)})", fontsize=9)
        fig.tight_layout()
        _savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def _savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
