"""Where the knots go: the :class:`KnotSchedule` protocol and its two schedules.

* :class:`ChainSchedule` (``schedules.fixed``): knots fixed in advance, as in the paper (evenly, on epoch
  boundaries, at fractions of the budget, or listed), and optionally a rank per link (rank step-down);
* :class:`AutoChainSchedule` (``schedules.adaptive``): a knot when the current link stops improving
  (``knots: auto``), decided from the observed training loss and dev scores.

``ChainOfLoRACallback`` drives any schedule through the protocol alone and calls every member unconditionally:
a fixed schedule implements the adaptive ones (``observe``, ``observe_dev``, ``state_dict``, ...) as no-ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from chainlora.schedules.adaptive import AutoChainSchedule, KnotDecision
from chainlora.schedules.fixed import ChainSchedule

__all__ = ["AutoChainSchedule", "ChainSchedule", "KnotDecision", "KnotSchedule"]


class KnotSchedule(Protocol):
    """What the callback (or a plain training loop) asks of a schedule, in optimizer steps (1-based)."""

    total_steps: int  # optimizer steps of the whole run: plain LoRA's budget, which the chain only splits
    adaptive: bool  # decides from observed losses: needs every step's loss, and has state to checkpoint

    @property
    def max_links(self) -> int:
        """The most links the chain can reach."""
        ...

    @property
    def decisions(self) -> Sequence[KnotDecision]:
        """Why each knot so far was tied (empty when the knots were fixed in advance)."""
        ...

    def knot_due(self, step: int, loss: float | None = None) -> bool:
        """True when a knot is to be tied right after optimizer step ``step``; call once per step."""
        ...

    def rank_of_link(self, link: int) -> int | None:
        """Rank of the 1-based ``link`` (``None``: keep the LoRA config's rank)."""
        ...

    def observe(self, step: int, loss: float, *, reduce: bool = False) -> None:
        """The training loss of optimizer step ``step``."""
        ...

    def observe_dev(self, step: int, score: float, *, higher_is_better: bool = True) -> None:
        """A dev evaluation made after optimizer step ``step``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the decisions so far depend on (JSON-serialisable), for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""
        ...
