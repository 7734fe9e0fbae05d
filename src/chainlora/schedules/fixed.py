"""A chain whose knots are fixed in advance (the paper's setting): :class:`ChainSchedule`.

The knots are optimizer steps, chosen before training: evenly, on epoch boundaries as the paper does, at
fractions of the budget, or given one by one. The total budget is plain LoRA's: a schedule only splits it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from chainlora.errors import ConfigError
from chainlora.schedules.adaptive import AutoChainSchedule, KnotDecision


@dataclass(frozen=True)
class ChainSchedule:
    """Where the knots go and the rank of each link, in optimizer steps.

    ``knots[i]`` is the optimizer step after which knot i+1 is tied (link 1 trains steps 1..knots[0]).
    ``ranks`` (optional) gives the rank of every link, ``len(knots) + 1`` entries; ``None`` keeps the LoRA
    config's rank. The total budget (``total_steps``) is the same as plain LoRA's: a schedule only splits it.
    Validated on construction: sorted, unique knots strictly inside ``(0, total_steps)``, positive ranks.
    """

    knots: tuple[int, ...]
    total_steps: int
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "knots", tuple(self.knots))
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(self.ranks))
        if (
            not isinstance(self.total_steps, int)
            or isinstance(self.total_steps, bool)
            or self.total_steps <= 0
        ):
            raise ConfigError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        for k in self.knots:
            if not isinstance(k, int) or isinstance(k, bool):
                raise ConfigError(f"knot {k!r} is not an integer optimizer step")
            if not 0 < k < self.total_steps:
                raise ConfigError(
                    f"knot at step {k} is outside the training budget (1..{self.total_steps - 1})"
                )
        for a, b in zip(self.knots, self.knots[1:], strict=False):
            if b == a:
                raise ConfigError(f"duplicate knot at step {a}")
            if b < a:
                raise ConfigError(f"knots must be sorted: step {b} comes after step {a}")
        if self.ranks is not None:
            if len(self.ranks) != len(self.knots) + 1:
                raise ConfigError(
                    f"ranks {list(self.ranks)} has {len(self.ranks)} entries; a chain with {len(self.knots)} "
                    f"knot(s) has {len(self.knots) + 1} links"
                )
            for r in self.ranks:
                if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                    raise ConfigError(f"link rank must be a positive integer, got {r!r}")

    @classmethod
    def even(
        cls,
        chain_length: int,
        total_steps: int,
        *,
        steps_per_epoch: int | None = None,
        ranks: Sequence[int] | None = None,
    ) -> ChainSchedule:
        """``chain_length`` links over ``total_steps``. With ``steps_per_epoch`` knots fall on epoch boundaries
        as in the paper (5 epochs, length 2 → link 1 = epochs 1–3, link 2 = epochs 4–5: knot i after epoch
        ⌈i·E/M⌉); otherwise on steps ``round(i·T/M)``."""
        if not isinstance(chain_length, int) or chain_length < 1:
            raise ConfigError(f"chain length must be a positive integer, got {chain_length!r}")
        if steps_per_epoch:
            epochs = math.ceil(total_steps / steps_per_epoch)
            if chain_length > epochs:
                raise ConfigError(
                    f"chain length {chain_length} is longer than the {epochs} epoch(s) of training"
                )
            knots = [steps_per_epoch * math.ceil(i * epochs / chain_length) for i in range(1, chain_length)]
        else:
            if chain_length > total_steps:
                raise ConfigError(
                    f"chain length {chain_length} is longer than the {total_steps} training steps"
                )
            knots = [round(i * total_steps / chain_length) for i in range(1, chain_length)]
        return cls(tuple(knots), total_steps, tuple(ranks) if ranks is not None else None)

    @classmethod
    def from_fractions(
        cls, fractions: Sequence[float], total_steps: int, *, ranks: Sequence[int] | None = None
    ) -> ChainSchedule:
        """Knots at fractions of the budget, e.g. ``(0.6,)`` over 5 epochs = a knot after epoch 3."""
        for f in fractions:
            if not 0.0 < f < 1.0:
                raise ConfigError(f"knot fraction {f!r} must be strictly between 0 and 1")
        knots = tuple(round(f * total_steps) for f in fractions)
        return cls(knots, total_steps, tuple(ranks) if ranks is not None else None)

    @property
    def chain_length(self) -> int:
        return len(self.knots) + 1

    def knot_due(self, step: int, loss: float | None = None) -> bool:
        """True when a knot is to be tied right after optimizer step ``step``."""
        return step in self.knots

    def rank_of_link(self, link: int) -> int | None:
        """Rank of the 1-based ``link`` (``None``: keep the configured rank)."""
        return self.ranks[link - 1] if self.ranks is not None else None

    # -- the adaptive members of the KnotSchedule protocol: a schedule fixed in advance ignores them ----------
    adaptive: ClassVar[bool] = False

    @property
    def max_links(self) -> int:
        """Links the chain reaches: ``len(knots) + 1``."""
        return self.chain_length

    @property
    def decisions(self) -> tuple[KnotDecision, ...]:
        """No decisions: every knot was placed in advance."""
        return ()

    def observe(self, step: int, loss: float, *, reduce: bool = False) -> None:
        """Nothing to learn from the training loss: the knots are fixed."""

    def observe_dev(self, step: int, score: float, *, higher_is_better: bool = True) -> None:
        """Nothing to learn from a dev score: the knots are fixed."""

    def state_dict(self) -> dict[str, Any]:
        """No state beyond the constructor's arguments."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def link_at(self, step: int) -> int:
        """1-based index of the link that trains optimizer step ``step`` (steps start at 1)."""
        return 1 + sum(1 for k in self.knots if k < step)

    @classmethod
    def auto(cls, total_steps: int, **kwargs: Any) -> AutoChainSchedule:
        """Adaptive knots (``knots: auto``): tie a knot when the current link stops improving; see
        :class:`~chainlora.schedules.AutoChainSchedule` for the arguments (``max_links``, ``min_link_steps``, ...)."""
        return AutoChainSchedule(total_steps, **kwargs)
