"""Property tests: any schedule input either builds a valid chain or fails with one ConfigError line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chainlora import ChainSchedule
from chainlora.errors import ConfigError

anything = st.one_of(
    st.integers(-5, 60), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3)
)


def assert_valid(schedule: ChainSchedule) -> None:
    knots = schedule.knots
    assert all(0 < k < schedule.total_steps for k in knots)
    assert list(knots) == sorted(set(knots))
    assert schedule.chain_length == len(knots) + 1
    if schedule.ranks is not None:
        assert len(schedule.ranks) == schedule.chain_length and min(schedule.ranks) > 0
    # every step belongs to exactly one link, links in order
    links = [schedule.link_at(s) for s in range(1, schedule.total_steps + 1)]
    assert links == sorted(links) and links[0] == 1 and links[-1] == schedule.chain_length


@settings(max_examples=300, deadline=None)
@given(
    knots=st.lists(anything, max_size=5),
    total_steps=anything,
    ranks=st.one_of(st.none(), st.lists(anything, max_size=6)),
)
def test_explicit_schedule_is_valid_or_one_config_error(knots, total_steps, ranks):
    try:
        schedule = ChainSchedule(tuple(knots), total_steps, tuple(ranks) if ranks is not None else None)
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message
        return
    assert_valid(schedule)


@settings(max_examples=300, deadline=None)
@given(
    chain_length=st.integers(-2, 12),
    total_steps=st.integers(1, 400),
    steps_per_epoch=st.one_of(st.none(), st.integers(1, 100)),
)
def test_even_schedule_splits_the_same_budget(chain_length, total_steps, steps_per_epoch):
    try:
        schedule = ChainSchedule.even(chain_length, total_steps, steps_per_epoch=steps_per_epoch)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    assert_valid(schedule)
    assert schedule.chain_length == chain_length and schedule.total_steps == total_steps
    if steps_per_epoch:
        assert all(k % steps_per_epoch == 0 for k in schedule.knots)


@settings(max_examples=200, deadline=None)
@given(
    fractions=st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=4),
    total_steps=st.integers(1, 500),
)
def test_fraction_schedule_is_valid_or_one_config_error(fractions, total_steps):
    try:
        schedule = ChainSchedule.from_fractions(fractions, total_steps)
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    assert_valid(schedule)
