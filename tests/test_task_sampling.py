"""Per-seed sampling is the harness's, deterministic, and keeps train/dev/test apart."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainlora.tasks import sample_indices


def harness_draw(n_train: int, n_valid: int, seed: int, num_train: int, num_dev: int, num_eval: int):
    """MeZO's sample_subset + run.py split, verbatim in spirit: global seed, permutation, slices."""
    np.random.seed(seed)
    drawn = np.random.permutation(n_train).tolist()[: num_train + num_dev]
    np.random.seed(seed)
    test = np.random.permutation(n_valid).tolist()[:num_eval]
    return drawn[:-num_dev], drawn[-num_dev:], test


@pytest.mark.parametrize(
    ("n_train", "n_valid", "num_dev"),
    [(2490, 277, 500), (67349, 872, 500), (250, 56, 100), (400, 100, 100), (554, 104, 500)],
)
@pytest.mark.parametrize("seed", [0, 42, 2**31])
def test_matches_the_harness_with_quirks(n_train, n_valid, num_dev, seed):
    train, dev, test = harness_draw(n_train, n_valid, seed, 1000, num_dev, 1000)
    drawn = sample_indices(n_train, n_valid, seed=seed, num_dev=num_dev, harness_quirks=True)
    assert (list(drawn.train), list(drawn.dev), list(drawn.test)) == (train, dev, test)


def test_does_not_touch_numpy_global_state():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    sample_indices(100, 50, seed=3)
    assert np.random.rand() == expected


def test_same_seed_same_rows_on_every_machine():
    drawn = sample_indices(10, 10, seed=0, num_train=4, num_dev=2, num_eval=3)
    # numpy's legacy MT19937 permutation is fixed across platforms and versions.
    assert drawn.train == (2, 8, 4, 9) and drawn.dev == (1, 6) and drawn.test == (2, 8, 4)
    assert sample_indices(10, 10, seed=0, num_train=4, num_dev=2, num_eval=3) == drawn
    assert sample_indices(10, 10, seed=1, num_train=4, num_dev=2, num_eval=3) != drawn


@pytest.mark.parametrize(
    ("n_train", "n_valid", "num_dev", "quirks", "sizes"),
    [
        (250, 56, 100, False, (150, 100, 56)),  # CB: as the harness
        (400, 100, 100, False, (300, 100, 100)),  # COPA: as the harness
        (554, 104, 500, True, (54, 500, 104)),  # WSC, harness quirk
        (554, 104, 500, False, (416, 138, 104)),  # WSC, fixed: dev cut to a quarter
        (2490, 277, 500, False, (1000, 500, 277)),  # RTE
        (5428, 638, 500, False, (1000, 500, 638)),  # WiC
    ],
)
def test_split_sizes(n_train, n_valid, num_dev, quirks, sizes):
    drawn = sample_indices(n_train, n_valid, seed=0, num_dev=num_dev, harness_quirks=quirks)
    assert (len(drawn.train), len(drawn.dev), len(drawn.test)) == sizes


def test_zero_dev_means_no_dev():
    drawn = sample_indices(100, 10, seed=0, num_train=20, num_dev=0)
    assert len(drawn.train) == 20 and drawn.dev == ()


@given(
    n_train=st.integers(0, 3000),
    n_valid=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
    num_train=st.integers(0, 1500),
    num_dev=st.integers(0, 800),
    num_eval=st.integers(0, 1500),
    quirks=st.booleans(),
)
def test_splits_are_disjoint_and_in_range(n_train, n_valid, seed, num_train, num_dev, num_eval, quirks):
    drawn = sample_indices(
        n_train,
        n_valid,
        seed=seed,
        num_train=num_train,
        num_dev=num_dev,
        num_eval=num_eval,
        harness_quirks=quirks,
    )
    assert not set(drawn.train) & set(drawn.dev)
    assert (
        len(set(drawn.train) | set(drawn.dev))
        == len(drawn.train) + len(drawn.dev)
        == min(n_train, num_train + num_dev)
    )
    assert all(0 <= i < n_train for i in drawn.train + drawn.dev)
    assert len(set(drawn.test)) == len(drawn.test) == min(n_valid, num_eval)
    assert all(0 <= i < n_valid for i in drawn.test)
    if not quirks:  # the fix: dev never outnumbers train
        assert len(drawn.dev) <= len(drawn.train)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        sample_indices(10, 10, seed=-1)
    with pytest.raises(ValueError, match="num_dev"):
        sample_indices(10, 10, seed=0, num_dev=-1)
