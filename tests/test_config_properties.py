"""Property tests of config validation: any values, from YAML or the command line, either build a valid
``TrainConfig`` (which survives its own round trip) or raise ``ConfigError`` with one line naming the field —
never another exception type."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chainlora.config import ChainSettings, EvalConfig, LoRASettings, TrainConfig, parse_config
from chainlora.errors import ConfigError

TOP = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("lora", "chain")]
LORA = [f.name for f in dataclasses.fields(LoRASettings)]
CHAIN = [f.name for f in dataclasses.fields(ChainSettings)]

# plausible values (so that valid configs are drawn too) mixed with every kind of junk YAML can produce
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 1e-3, 5e-4]),
    st.sampled_from(["", " ", "cola", "lora", "full", "rte", "linear", "jagged", "fp32", "bf16", "last"]),
    st.sampled_from(["dev_loss", "adamw", "sgd", "gaussian", "kaiming", "all-linear", "skip", "halt", "x/y"]),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner)
    ),
    max_leaves=6,
)
int_lists = st.lists(st.one_of(st.integers(-2, 40), st.floats(-1, 2), st.booleans()), max_size=4)


def _section(names: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(
        st.one_of(st.sampled_from(names), st.text(max_size=5)),
        st.one_of(values, int_lists),
        max_size=4,
    )


configs = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(TOP, st.one_of(values, int_lists)),
        "lora": st.one_of(_section(LORA), values),
        "chain": st.one_of(_section(CHAIN), values),
    },
)


def _check_error(err: ConfigError) -> None:
    message = str(err)
    assert message and "\n" not in message, message
    assert ":" in message, message  # "<field>: <problem>"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.dictionaries(st.integers(), scalars, max_size=1))
@example(data={"chain": {"length": 2, "\n": []}}, junk_keys={})  # an unknown nested key holding a newline
def test_any_yaml_mapping_is_a_valid_config_or_one_config_error(data, junk_keys):
    data = {**data, **junk_keys}  # YAML allows non-string keys
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError as err:
        _check_error(err)
        return
    again = TrainConfig.from_dict(config.to_dict())  # what config.yaml holds rebuilds the same config
    assert again == config
    assert config.lr > 0 and math.isfinite(config.lr)
    assert config.chain.links >= 1
    if config.chain.ranks is not None:
        assert len(config.chain.ranks) == config.chain.links and config.chain.ranks[0] == config.lora.r


options = st.sampled_from(
    [f"--{n}" for n in TOP if n not in ("resume",)]
    + [f"--lora.{n}" for n in LORA]
    + [f"--chain.{n}" for n in CHAIN]
    + ["--bogus", "--lora.bogus", "--lora", "--chain"]
)
texts = st.one_of(
    st.sampled_from(
        ["1", "0", "-1", "2.5", "nan", "inf", "null", "true", "[]", "[1, 2]", "[0.5]", "{}", "abc"]
    ),
    st.sampled_from(["[8, 4]", "{r: 4}", "'x'", "[q_proj]", "1e400", "9" * 400, "[", "{a: [", ": :"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(options, texts), max_size=3))
@example(pairs=[("--lora.alpha", "9" * 400)])  # an int beyond the float range
def test_any_command_line_is_a_valid_config_or_one_config_error(pairs):
    argv = [part for option, text in pairs for part in (option, text)]
    try:
        parse_config(TrainConfig, argv, prog="chainlora train")
    except ConfigError as err:
        _check_error(err)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(EvalConfig)]), values, max_size=4))
def test_any_eval_config_is_valid_or_one_config_error(data):
    try:
        EvalConfig(**data)
    except ConfigError as err:
        _check_error(err)
