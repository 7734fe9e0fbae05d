"""Random streams derived from one seed: stream ``index`` of a run seeded ``seed`` is a pure function of both.

Used for each new link's A (``index`` = the link: every process of a distributed run, and a resumed run, draw
the very same A) and for each epoch's batch order (``index`` = the epoch: a run resumed mid-epoch replays it).
"""

from __future__ import annotations

import torch


def derived_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` of a run seeded ``seed``."""
    return seed * 1_000_003 + index


def derived_generator(seed: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(seed, index))
