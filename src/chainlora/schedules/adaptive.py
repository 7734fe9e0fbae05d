"""Adaptive knots (``knots: auto``): extend the chain when the current link has stopped improving.

The COLA paper fixes the knots in advance and leaves "where to extend the chain" to future work, suggesting
the convergence of the loss. :class:`AutoChainSchedule` ties a knot when the current link has converged:

* **loss signal**: the exponentially smoothed training loss improved, over the last ``patience`` steps, by
  less than a relative ``threshold``: ``(L̄[t - patience] - L̄[t]) / |L̄[t - patience]| < threshold``;
* **dev signal** (when dev evaluation runs and feeds :meth:`AutoChainSchedule.observe_dev`): the chain's best
  dev score has not improved for ``dev_patience`` evaluations since the last knot.

Guards, checked before any signal: a link trains at least ``min_link_steps`` steps, the new link must still get
at least ``min_link_steps`` steps before ``total_steps`` (the same budget as plain LoRA), and the chain never
exceeds ``max_links`` links. Decisions are a pure function of the observed numbers, so a run is deterministic
for a given seed, identical on every process when every process observes the same (all-reduced) loss, and
identical after a resume once :meth:`AutoChainSchedule.load_state_dict` restored the saved state.

Usage in a plain loop::

    schedule = AutoChainSchedule(total_steps=1000, max_links=4, min_link_steps=100, patience=50,
                                 threshold=0.01)
    for step in range(1, 1001):
        loss = train_step()
        schedule.observe(step, loss)
        if schedule.knot_due(step):
            tie_knot(model, optimizer, rank=schedule.rank_of_link(chain_length(model) + 1))

With the HF ``Trainer``, ``ChainOfLoRACallback(schedule)`` feeds the logged loss (``logging_steps=1`` is
required) and the dev metric to the schedule, and saves/restores its state in every checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from chainlora.errors import ConfigError

logger = logging.getLogger("chainlora")

Signal = Literal["loss", "dev", "either"]
STATE_VERSION = 1


@dataclass(frozen=True)
class KnotDecision:
    """Why a knot was tied: the step, which link it closed, and the numbers behind the decision."""

    step: int  # optimizer step after which the knot is tied
    link: int  # 1-based index of the link that the knot ties (merges into the base)
    signal: str  # "loss" or "dev"
    smoothed_loss: float | None  # EMA of the training loss at the latest observation (None: no loss seen)
    reference_step: int | None  # step of the smoothed loss the improvement is measured against
    relative_improvement: float | None  # (L̄_ref - L̄_now) / |L̄_ref| over the window
    slope: float | None  # (L̄_now - L̄_ref) / (steps between them): change of the smoothed loss per step
    dev_score: float | None  # the chain's best dev score so far (dev signal only)
    reason: str  # one readable line


class AutoChainSchedule:
    """Knots where the current link stops improving, within the plain-LoRA step budget.

    A :class:`~chainlora.schedules.KnotSchedule`: ``observe``/``observe_dev`` are its inputs, ``knot_due``
    decides, ``decisions`` says why, ``state_dict``/``load_state_dict`` carry it across a resume.

    Invariants, whatever the observed values: consecutive knots are at least ``min_link_steps`` apart, the
    first knot is at step ≥ ``min_link_steps``, the last one at step ≤ ``total_steps - min_link_steps``, and
    there are at most ``max_links - 1`` knots.

    Args:
        total_steps: optimizer steps of the whole run (the same budget as plain LoRA).
        max_links: most links in the chain (``1`` = plain LoRA, never a knot).
        min_link_steps: fewest optimizer steps any link trains (also the last one).
        patience: window, in steps, over which the smoothed loss must improve.
        threshold: least relative improvement of the smoothed loss over ``patience`` steps that counts as
            "still improving" (``0.01`` = 1 %).
        ema: weight of the past in the loss smoothing ``L̄ ← ema·L̄ + (1 - ema)·loss`` (``0`` = no smoothing).
        ranks: rank rule for the links: ``None``/``"fixed"`` keeps ``rank`` (or the LoRA config's rank when
            ``rank`` is None); ``"halve"`` gives link i the rank ``max(min_rank, rank // 2**(i-1))``; a
            sequence gives every link's rank explicitly (``max_links`` entries).
        rank: rank of the first link (required by ``"halve"``).
        min_rank: lower bound of the ``"halve"`` rule.
        signal: which signal ties a knot: ``"loss"``, ``"dev"`` (only dev evaluations) or ``"either"``.
        dev_patience: dev evaluations since the last knot without a new best dev score that count as a stall.
    """

    adaptive = True  # decides from the observed losses (see KnotSchedule)

    def __init__(
        self,
        total_steps: int,
        *,
        max_links: int,
        min_link_steps: int,
        patience: int,
        threshold: float,
        ema: float = 0.9,
        ranks: Literal["fixed", "halve"] | Sequence[int] | None = None,
        rank: int | None = None,
        min_rank: int = 1,
        signal: Signal = "either",
        dev_patience: int = 1,
    ) -> None:
        for name, value, least in (
            ("total_steps", total_steps, 1),
            ("max_links", max_links, 1),
            ("min_link_steps", min_link_steps, 1),
            ("patience", patience, 1),
            ("min_rank", min_rank, 1),
            ("dev_patience", dev_patience, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"auto knots: {name} must be an integer ≥ {least}, got {value!r}")
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold >= 0):
            raise ConfigError(f"auto knots: threshold must be a finite number ≥ 0, got {threshold!r}")
        if not (isinstance(ema, int | float) and 0.0 <= ema < 1.0):
            raise ConfigError(f"auto knots: ema must be in [0, 1), got {ema!r}")
        if signal not in ("loss", "dev", "either"):
            raise ConfigError(f"auto knots: signal must be 'loss', 'dev' or 'either', got {signal!r}")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ConfigError(f"auto knots: rank must be a positive integer, got {rank!r}")
        if ranks == "halve" and rank is None:
            raise ConfigError("auto knots: ranks='halve' needs the first link's rank (rank=...)")
        if isinstance(ranks, str):
            if ranks not in ("fixed", "halve"):
                raise ConfigError(f"auto knots: ranks must be 'fixed', 'halve' or a list, got {ranks!r}")
        elif ranks is not None:
            ranks = tuple(ranks)
            if len(ranks) != max_links:
                raise ConfigError(
                    f"auto knots: ranks {list(ranks)} has {len(ranks)} entries; give one per link "
                    f"(max_links={max_links})"
                )
            for r in ranks:
                if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                    raise ConfigError(f"auto knots: link rank must be a positive integer, got {r!r}")
        self.total_steps = total_steps
        self.max_links = max_links
        self.min_link_steps = min_link_steps
        self.patience = patience
        self.threshold = float(threshold)
        self.ema = float(ema)
        self.ranks = None if ranks == "fixed" else ranks
        self.rank = rank
        self.min_rank = min_rank
        self.signal = signal
        self.dev_patience = dev_patience
        self._reset_state()

    def _reset_state(self) -> None:
        self.knots: list[int] = []  # steps after which knots were tied
        self.decisions: list[KnotDecision] = []
        self._smoothed: float | None = None  # EMA of the loss
        self._last_step = 0  # step of the latest loss observation
        self._window: list[tuple[int, float]] = []  # (step, EMA) of the current link, pruned to the window
        self._dev_best: float | None = None  # best dev score of the chain (larger = better)
        self._dev_stale = 0  # dev evaluations since the last knot that did not beat _dev_best
        self._dev_last_step = 0

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def link_start(self) -> int:
        """Step after which the current link started (0 for the first link)."""
        return self.knots[-1] if self.knots else 0

    def observe(self, step: int, loss: float, *, reduce: bool = False) -> None:
        """Feed the training loss of optimizer step ``step`` (steps increase; a repeated or older step is
        ignored, a non-finite loss is skipped with a warning). With ``reduce`` the loss is first averaged over
        the processes of an initialised ``torch.distributed`` group, so that every process decides alike (the
        HF Trainer's logged loss is already averaged: leave ``reduce`` off there)."""
        if step <= self._last_step:
            return
        if reduce:
            loss = _all_reduce_mean(loss)
        loss = float(loss)
        if not math.isfinite(loss):
            logger.warning("chainlora: auto knots skip the non-finite loss %r at step %d", loss, step)
            return
        self._last_step = step
        self._smoothed = loss if self._smoothed is None else self.ema * self._smoothed + (1 - self.ema) * loss
        self._window.append((step, self._smoothed))
        # keep the newest point at or before `step - patience` (the reference) and everything after it
        while len(self._window) >= 2 and self._window[1][0] <= step - self.patience:
            self._window.pop(0)

    def observe_dev(self, step: int, score: float, *, higher_is_better: bool = True) -> None:
        """Feed a dev evaluation made after optimizer step ``step`` (e.g. accuracy, or a loss with
        ``higher_is_better=False``). Any new best of the chain resets the stall count."""
        if step <= self._dev_last_step:
            return
        score = float(score) if higher_is_better else -float(score)
        if not math.isfinite(score):
            logger.warning("chainlora: auto knots skip the non-finite dev score at step %d", step)
            return
        self._dev_last_step = step
        if self._dev_best is None or score > self._dev_best:
            self._dev_best, self._dev_stale = score, 0
        else:
            self._dev_stale += 1

    # ---------------------------------------------------------------------------------------- decision
    def knot_due(self, step: int, loss: float | None = None) -> bool:
        """True when a knot is to be tied right after optimizer step ``step``; a True answer records the knot
        (call once per step, then tie it). Decides from what :meth:`observe` / :meth:`observe_dev` received;
        ``loss`` is accepted for the ``KnotSchedule`` protocol and ignored."""
        if len(self.knots) + 1 >= self.max_links:
            return False
        if step - self.link_start < self.min_link_steps or self.total_steps - step < self.min_link_steps:
            return False
        decision = self._stall(step)
        if decision is None:
            return False
        self.knots.append(step)
        self.decisions.append(decision)
        self._window = [(s, v) for s, v in self._window if s >= step][-1:]
        self._dev_stale = 0
        logger.info("chainlora: auto knot — %s", decision.reason)
        return True

    def _stall(self, step: int) -> KnotDecision | None:
        """The decision to tie now, or None while the current link still improves."""
        link = len(self.knots) + 1
        window = [(s, v) for s, v in self._window if s >= self.link_start]
        reference = window[0] if window and window[0][0] <= self._last_step - self.patience else None
        smoothed = self._smoothed
        if self.signal in ("loss", "either") and reference is not None and smoothed is not None:
            ref_step, ref_value = reference
            improvement = (ref_value - smoothed) / max(abs(ref_value), 1e-12)
            slope = (smoothed - ref_value) / (self._last_step - ref_step)
            if improvement < self.threshold:
                return KnotDecision(
                    step=step,
                    link=link,
                    signal="loss",
                    smoothed_loss=smoothed,
                    reference_step=ref_step,
                    relative_improvement=improvement,
                    slope=slope,
                    dev_score=None,
                    reason=(
                        f"step {step}, link {link}: smoothed loss {smoothed:.6g} improved {improvement:.3%} "
                        f"since step {ref_step} (slope {slope:.3g}/step), below the threshold "
                        f"{self.threshold:.3%}"
                    ),
                )
        if self.signal in ("dev", "either") and self._dev_stale >= self.dev_patience:
            return KnotDecision(
                step=step,
                link=link,
                signal="dev",
                smoothed_loss=smoothed,
                reference_step=None,
                relative_improvement=None,
                slope=None,
                dev_score=self._dev_best,
                reason=(
                    f"step {step}, link {link}: no new best dev score in {self._dev_stale} evaluation(s) "
                    f"since the last knot (best {self._dev_best:.6g}, larger is better)"
                ),
            )
        return None

    def rank_of_link(self, link: int) -> int | None:
        """Rank of the 1-based ``link`` by the rank rule (``None``: keep the LoRA config's rank)."""
        if isinstance(self.ranks, tuple):
            return self.ranks[min(link, len(self.ranks)) - 1]
        if self.ranks == "halve":
            return max(self.min_rank, self.rank >> (link - 1))
        return self.rank

    @property
    def chain_length(self) -> int:
        """Links so far (knots tied + the current one)."""
        return len(self.knots) + 1

    # ------------------------------------------------------------------------------------------ resume
    def _config(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "max_links": self.max_links,
            "min_link_steps": self.min_link_steps,
            "patience": self.patience,
            "threshold": self.threshold,
            "ema": self.ema,
            "ranks": list(self.ranks) if isinstance(self.ranks, tuple) else self.ranks,
            "rank": self.rank,
            "min_rank": self.min_rank,
            "signal": self.signal,
            "dev_patience": self.dev_patience,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the decisions depend on, JSON-serialisable (floats round-trip exactly through JSON)."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "knots": list(self.knots),
            "decisions": [asdict(d) for d in self.decisions],
            "smoothed": self._smoothed,
            "last_step": self._last_step,
            "window": [list(p) for p in self._window],
            "dev_best": self._dev_best,
            "dev_stale": self._dev_stale,
            "dev_last_step": self._dev_last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state saved with other settings (decisions would differ)."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"auto knots: unknown state version {state.get('version')!r}")
        saved, mine = state["config"], self._config()
        changed = [k for k in mine if saved.get(k) != mine[k]]
        if changed:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in changed)
            raise ConfigError(
                f"auto knots: the saved schedule state was made with other settings ({details})"
            )
        self.knots = [int(k) for k in state["knots"]]
        self.decisions = [KnotDecision(**d) for d in state["decisions"]]
        self._smoothed = state["smoothed"]
        self._last_step = int(state["last_step"])
        self._window = [(int(s), float(v)) for s, v in state["window"]]
        self._dev_best = state["dev_best"]
        self._dev_stale = int(state["dev_stale"])
        self._dev_last_step = int(state["dev_last_step"])

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"AutoChainSchedule({settings}; knots={self.knots})"


def _all_reduce_mean(value: float) -> float:
    """Mean of ``value`` over the processes of the default ``torch.distributed`` group (itself when none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()
