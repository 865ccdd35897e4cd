"""SamplingParams validation: every rule, each error naming its field."""

from __future__ import annotations

import math

import pytest

from kimi_grpc import SamplingParams as Exported
from kimi_grpc.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    SamplingParams,
    SamplingParamsError,
)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert Exported is SamplingParams
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert p.include_stop_str_in_output is False and p.ignore_eos is False
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.logit_bias) == (16, 0, None, None)
    assert p.skip_special_tokens is True
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.9e-5).greedy and not SamplingParams(temperature=1e-5).greedy


def test_error_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError) as info:
        SamplingParams(temperature=-1)
    assert isinstance(info.value, SamplingParamsError)
    assert info.value.field == "temperature"
    assert str(info.value).startswith("temperature must be >= 0, got -1")


def test_normalisation():
    p = SamplingParams(
        temperature=0,
        top_p=1,
        stop="END",
        stop_token_ids=(3, 4),
        logit_bias={5: 1, 6: -2.5},
        presence_penalty=1,
    )
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert isinstance(p.top_p, float) and isinstance(p.presence_penalty, float)
    assert p.stop == ["END"] and p.stop_token_ids == [3, 4]
    assert p.logit_bias == {5: 1.0, 6: -2.5}
    assert all(isinstance(v, float) for v in p.logit_bias.values())
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


VALID_EDGES = [
    ("n", 1),
    ("n", MAX_N),
    ("temperature", 0.0),
    ("temperature", 100.0),
    ("top_p", 1e-6),
    ("top_p", 1.0),
    ("top_k", -1),
    ("top_k", 0),
    ("top_k", 1),
    ("top_k", 200_000),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("presence_penalty", -2.0),
    ("presence_penalty", 2.0),
    ("frequency_penalty", -2),
    ("frequency_penalty", 2),
    ("repetition_penalty", 1e-3),
    ("repetition_penalty", 2.0),
    ("seed", 0),
    ("seed", 2**63 - 1),
    ("stop", ["x" * 256] * 16),
    ("stop_token_ids", [0, 163_839]),
    ("max_tokens", 1),
    ("max_tokens", None),
    ("min_tokens", 16),
    ("logprobs", 0),
    ("logprobs", MAX_LOGPROBS),
    ("logit_bias", {0: -100, 1: 100.0}),
    ("logit_bias", {i: 0.0 for i in range(1024)}),
]


@pytest.mark.parametrize(("name", "value"), VALID_EDGES)
def test_valid_edges_are_accepted(name, value):
    SamplingParams(**{name: value})


INVALID = [
    # ranges
    ("n", 0),
    ("n", MAX_N + 1),
    ("temperature", -1e-9),
    ("top_p", 0.0),
    ("top_p", 1.0001),
    ("top_k", -2),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("frequency_penalty", -3),
    ("frequency_penalty", 2.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 2.01),
    ("seed", -1),
    ("seed", 2**63),
    ("stop", [""]),
    ("stop", ""),
    ("stop", ["x" * 257]),
    ("stop", ["s"] * 17),
    ("stop_token_ids", [-1]),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logit_bias", {1: 100.5}),
    ("logit_bias", {1: -101}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {i: 0.0 for i in range(1025)}),
    # NaN / inf in every float field
    *[
        (name, bad)
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        )
        for bad in (math.nan, math.inf, -math.inf)
    ],
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {1: math.inf}),
    # types
    ("n", 2.0),
    ("n", True),
    ("temperature", "0.7"),
    ("temperature", None),
    ("temperature", True),
    ("top_p", "1"),
    ("top_k", 1.0),
    ("top_k", True),
    ("min_p", [0.1]),
    ("repetition_penalty", False),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "42"),
    ("stop", 3),
    ("stop", ["ok", 3]),
    ("stop", {"a": 1}),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", ["1"]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("stop_token_ids", None),
    ("include_stop_str_in_output", 1),
    ("ignore_eos", "yes"),
    ("max_tokens", 16.0),
    ("max_tokens", True),
    ("min_tokens", None),
    ("min_tokens", 1.5),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("logit_bias", [(1, 1.0)]),
    ("logit_bias", {"1": 1.0}),
    ("logit_bias", {1.0: 1.0}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {1: "1"}),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}"[:40] for n, v in INVALID])
def test_invalid_values_raise_naming_the_field(name, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{name: value})
    assert info.value.field == name
    assert name in str(info.value)


def test_min_tokens_cannot_exceed_max_tokens():
    SamplingParams(min_tokens=16, max_tokens=16)
    SamplingParams(min_tokens=1000, max_tokens=None)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=17, max_tokens=16)
    assert info.value.field == "min_tokens" and "max_tokens" in str(info.value)


def test_validate_token_ids_against_the_vocabulary():
    SamplingParams(stop_token_ids=[99], logit_bias={99: 1.0}).validate_token_ids(100)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop_token_ids=[5, 100]).validate_token_ids(100)
    assert info.value.field == "stop_token_ids" and "100" in str(info.value)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias={3: 1.0, 250: -1.0}).validate_token_ids(100)
    assert info.value.field == "logit_bias" and "250" in str(info.value)


def test_completion_seed():
    assert SamplingParams().completion_seed(3) is None
    p = SamplingParams(seed=7, n=4)
    assert [p.completion_seed(i) for i in range(4)] == [7, 8, 9, 10]
    assert SamplingParams(seed=2**63 - 1).completion_seed(1) == 0
