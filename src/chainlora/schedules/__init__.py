"""Where the knots go: the adaptive schedule (``knots: auto``)."""

from chainlora.schedules.adaptive import AutoChainSchedule, KnotDecision

__all__ = ["AutoChainSchedule", "KnotDecision"]
