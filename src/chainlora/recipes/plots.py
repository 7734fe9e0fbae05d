"""The run's loss curve as a PNG: training loss per step, dev loss per evaluation, knots as vertical lines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chainlora.io import atomic_path


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
