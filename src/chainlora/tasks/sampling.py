"""Per-seed train/dev/test sampling, exactly as the MeZO harness draws them.

For seed S (``np.random.seed(S)`` then ``np.random.permutation(n)``; here a ``RandomState(S)``, which gives the
same permutation without touching numpy's global state, so the same seed picks the same rows on every machine):

- train + dev = the first ``num_train + num_dev`` indices of a permutation of the train pool; dev = the last
  ``num_dev`` of those, train = the rest. A pool smaller than that is used whole, dev still from its end.
- test = the first ``num_eval`` indices of a permutation of the test pool with the same S (smaller: whole).

The harness's WSC quirk: WSC's 554 train rows are not special-cased, so its default dev of 500 leaves 54 train
rows. ``harness_quirks=True`` reproduces that. By default (``False``) a dev set that would outnumber the train
set it comes from is cut to a quarter of the drawn rows (WSC: 416 train / 138 dev); CB (150/100) and COPA
(300/100) are untouched. ``num_dev=0`` means no dev set (in the harness it would take the whole draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitIndices:
    """Row indices into the train pool (``train``, ``dev``: disjoint) and the test pool (``test``)."""

    train: tuple[int, ...]
    dev: tuple[int, ...]
    test: tuple[int, ...]


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """``np.random.seed(seed); np.random.permutation(n)``, without changing numpy's global random state."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return np.random.RandomState(seed).permutation(n)


def sample_indices(
    train_pool_size: int,
    test_pool_size: int,
    *,
    seed: int,
    num_train: int = 1000,
    num_dev: int = 500,
    num_eval: int = 1000,
    harness_quirks: bool = False,
) -> SplitIndices:
    """The harness's per-seed draw (see the module docstring). Sizes are upper bounds; small pools are used whole."""
    for name, value in (("num_train", num_train), ("num_dev", num_dev), ("num_eval", num_eval)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    drawn = seeded_permutation(train_pool_size, seed)[: num_train + num_dev].tolist()
    dev_size = min(num_dev, len(drawn))
    if not harness_quirks and dev_size > len(drawn) - dev_size:
        dev_size = len(drawn) // 4
    train, dev = drawn[: len(drawn) - dev_size], drawn[len(drawn) - dev_size :]
    test = seeded_permutation(test_pool_size, seed)[:num_eval].tolist()
    return SplitIndices(tuple(train), tuple(dev), tuple(test))
