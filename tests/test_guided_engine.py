"""Guided decoding in the engine (demo model): valid output, reasoning handover, batch invariance,
n > 1, preemption, stop strings, and a refused token failing only its own request."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kimi_grpc.checkpoint_maker import make_checkpoint
from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.engine.outputs import CompletionOutput, RequestOutput
from kimi_grpc.guided import Constraint
from kimi_grpc.guided.constraint import build_constraint
from kimi_grpc.guided.masks import MaskFiller
from kimi_grpc.model import KimiForCausalLM
from kimi_grpc.parsers import parse_output
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import KimiTokenizer
from tests.test_engine import make_engine, token_bytes

pytestmark = pytest.mark.usefixtures("scheduling_mode")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get.weather-now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "terms": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "exact": {"type": "boolean"},
            },
            "required": ["terms", "exact"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("guided"), "demo", seed=3)
    model = KimiForCausalLM.from_checkpoint(path, dtype=torch.float32)
    return model, KimiTokenizer.from_dir(path)


def constraint(engine: LLMEngine, **kwargs) -> Constraint:
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("tool_choice", "required")
    c = build_constraint(engine.grammar_backend, engine.tokenizer, engine.guided_stats, **kwargs)
    assert c is not None
    return c


def closing_bias(tokenizer: KimiTokenizer) -> dict[int, float]:
    """Makes a random model close strings, arrays, objects and sections soon (the grammar still
    decides what is valid; this only keeps outputs short)."""
    bias = {}
    for text in ('"', "}", "]", ","):
        (token,) = tokenizer.encode(text)
        bias[token] = 12.0
    for name in ("<|tool_call_end|>", "<|tool_calls_section_end|>", "<|im_end|>"):
        bias[tokenizer.token_id(name)] = 12.0
    return bias


def run(engine: LLMEngine, requests) -> list[RequestOutput]:
    """requests: (prompt ids, params, constraint or None); all submitted, then stepped."""
    results = {}
    for i, (prompt, params, c) in enumerate(requests):
        ids = engine.add_request(f"r{i}", prompt, params, constraint=c)
        outputs = [CompletionOutput(j) for j in range(params.n)]
        results[f"r{i}"] = RequestOutput(f"r{i}", ids, outputs)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            results[delta.request_id].apply(delta)
    return [results[f"r{i}"] for i in range(len(requests))]


def prompt(tokenizer: KimiTokenizer, i: int) -> list[int]:
    return tokenizer.encode(f"request {i}: what is the weather in city number {i * 7}?")


def decoded(tokenizer: KimiTokenizer, out: CompletionOutput) -> str:
    return tokenizer.decode(out.token_ids, skip_special_tokens=True)


def assert_valid_calls(tokenizer, out: CompletionOutput, *, thinking: bool = False) -> int:
    """Every call of a finished completion names a declared tool with valid arguments."""
    parsed = parse_output(decoded(tokenizer, out), thinking=thinking, tools=TOOLS)
    if out.finish_reason != "stop":
        return 0
    assert parsed.tool_calls, decoded(tokenizer, out)
    assert not parsed.errors, parsed.errors
    for call in parsed.tool_calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return len(parsed.tool_calls)


def test_required_calls_are_valid_for_greedy_and_sampled(demo):
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine)
    bias = closing_bias(tokenizer)
    requests = [
        (
            prompt(tokenizer, i),
            SamplingParams(temperature=t, seed=i, max_tokens=96, logit_bias=bias),
            c,
        )
        for i in range(12)
        for t in (0.0, 1.0)
    ]
    outputs = run(engine, requests)
    calls = sum(assert_valid_calls(tokenizer, o.outputs[0]) for o in outputs)
    assert sum(o.finish_reason == "stop" for o in outputs) >= len(outputs) // 2
    assert calls >= len(outputs) // 2
    assert engine.guided_stats.constrained_requests == len(requests)
    assert engine.guided_stats.rejected_tokens == 0
    assert engine.blocks.num_used_pages == 0


def test_outputs_are_batch_invariant(demo):
    """A guided request's tokens do not depend on what else runs in its batch (greedy and
    seeded), including unguided neighbours and other grammars."""
    tokenizer = demo[1]
    bias = closing_bias(tokenizer)

    def requests(engine):
        tools = constraint(engine)
        answer = constraint(engine, tools=[], tool_choice="auto", response_schema=ANSWER_SCHEMA)
        return [
            (
                prompt(tokenizer, 0),
                SamplingParams(temperature=0, max_tokens=48, logit_bias=bias),
                tools,
            ),
            (
                prompt(tokenizer, 1),
                SamplingParams(temperature=1, seed=5, max_tokens=48, logit_bias=bias),
                tools,
            ),
            (
                prompt(tokenizer, 2),
                SamplingParams(temperature=1, seed=6, max_tokens=48, logit_bias=bias),
                answer,
            ),
        ]

    alone = []
    for i in range(3):
        engine = make_engine(demo, enable_prefix_caching=False)
        alone.append(run(engine, [requests(engine)[i]])[0].token_ids)
    engine = make_engine(demo)
    noise = [
        (prompt(tokenizer, 10 + i), SamplingParams(temperature=1, seed=i, max_tokens=40), None)
        for i in range(5)
    ]
    batched = run(engine, noise[:2] + requests(engine) + noise[2:])
    assert [o.token_ids for o in batched[2:5]] == alone


def test_n_completions_each_follow_their_own_grammar_state(demo):
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine, tools=[], tool_choice="auto", response_schema=ANSWER_SCHEMA)
    params = SamplingParams(
        n=4, temperature=1, seed=11, max_tokens=48, logit_bias=closing_bias(tokenizer)
    )
    (result,) = run(engine, [(prompt(tokenizer, 3), params, c)])
    texts = [decoded(tokenizer, o) for o in result.outputs]
    assert len(set(texts)) > 1  # the completions differ...
    for out, text in zip(result.outputs, texts, strict=True):
        if out.finish_reason == "stop":  # ...and each is a valid answer
            jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    # Each completion equals the same seed run alone (its guide saw only its own tokens).
    for i, out in enumerate(result.outputs):
        engine = make_engine(demo, enable_prefix_caching=False)
        single = SamplingParams(
            temperature=1,
            seed=params.completion_seed(i),
            max_tokens=48,
            logit_bias=params.logit_bias,
        )
        (alone,) = run(engine, [(prompt(tokenizer, 3), single, c)])
        assert alone.token_ids == out.token_ids


def test_preemption_keeps_one_consistent_grammar_state(demo):
    """Recomputation after preemption feeds no token twice: outputs equal an unpressured run."""
    tokenizer = demo[1]
    bias = closing_bias(tokenizer)

    def outputs(**config):
        engine = make_engine(demo, **config)
        c = constraint(engine)
        params = SamplingParams(temperature=1, seed=2, max_tokens=64, logit_bias=bias)
        result = run(engine, [(prompt(tokenizer, i) * 8, params, c) for i in range(8)])
        return engine, [o.token_ids for o in result]

    _, free = outputs()
    tight, pressured = outputs(kv_cache_memory=9 * 64 * token_bytes(demo))
    assert tight.scheduler.num_preemptions > 0
    assert pressured == free


def test_thinking_is_unconstrained_until_it_ends(demo):
    """While reasoning only the bare call markers and <think> are banned; greedy reasoning equals
    the unguided run's up to the first banned token."""
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine, tool_choice="auto", thinking=True)
    params = SamplingParams(temperature=0, max_tokens=40)
    guided, free = run(
        engine, [(prompt(tokenizer, 4), params, c), (prompt(tokenizer, 4), params, None)]
    )
    banned = set(c.reasoning_banned)
    cut = next((i for i, t in enumerate(free.token_ids) if t in banned), len(free.token_ids))
    assert guided.token_ids[:cut] == free.token_ids[:cut]
    assert not banned & set(guided.token_ids)


@pytest.mark.parametrize("opener", ["</think>", "<|tool_calls_section_begin|>"])
def test_reasoning_hands_over_to_the_grammar(demo, opener):
    """The model ending its reasoning with </think> or opening a section starts the grammar."""
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine, tool_choice="auto", thinking=True)
    bias = closing_bias(tokenizer)
    bias[tokenizer.token_id(opener)] = 100.0  # the first token ends the reasoning
    if opener == "</think>":  # then make the model open a section (auto would allow text)
        bias[tokenizer.token_id("<|tool_calls_section_begin|>")] = 60.0
    params = SamplingParams(temperature=0, max_tokens=96, logit_bias=bias)
    (result,) = run(engine, [(prompt(tokenizer, 5), params, c)])
    out = result.outputs[0]
    assert out.token_ids[0] == tokenizer.token_id(opener)
    assert out.finish_reason == "stop", decoded(tokenizer, out)
    assert assert_valid_calls(tokenizer, out, thinking=True) >= 1


def test_stop_strings_do_not_cut_a_json_value(demo):
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine, tools=[], tool_choice="auto", response_schema=ANSWER_SCHEMA)
    params = SamplingParams(
        temperature=0, max_tokens=48, stop=['"', ":", "true"], logit_bias=closing_bias(tokenizer)
    )
    (result,) = run(engine, [(prompt(tokenizer, 6), params, c)])
    assert result.finish_reason == "stop" and result.outputs[0].stop_reason != '"'
    jsonschema.validate(json.loads(result.text), ANSWER_SCHEMA)


def test_tool_choice_none_bans_every_marker(demo):
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine, tool_choice="none")
    assert c.grammar is None
    markers = set(c.banned)
    bias = {m: 100.0 for m in markers}  # the model would sample nothing else
    (result,) = run(
        engine, [(prompt(tokenizer, 7), SamplingParams(max_tokens=16, logit_bias=bias), c)]
    )
    assert not markers & set(result.token_ids)


def test_a_refused_token_fails_only_its_request(demo, monkeypatch):
    """With masks disabled the random model soon samples a token the grammar refuses: that
    request fails with an error (never continues unconstrained); its neighbour finishes."""
    engine = make_engine(demo)
    tokenizer = engine.tokenizer
    c = constraint(engine)
    monkeypatch.setattr(MaskFiller, "start", lambda self, rows: None)
    params = SamplingParams(temperature=0, max_tokens=24)
    failed, neighbour = run(
        engine, [(prompt(tokenizer, 8), params, c), (prompt(tokenizer, 9), params, None)]
    )
    assert failed.finish_reason == "abort"
    assert "guided decoding refused token" in failed.outputs[0].error
    assert neighbour.finish_reason == "length" and neighbour.outputs[0].error is None
    assert engine.guided_stats.rejected_tokens == 1
    assert engine.blocks.num_used_pages == 0


def test_grammar_requests_need_the_backend(demo):
    engine = make_engine(demo)
    c = constraint(engine)
    off = make_engine(demo, guided_decoding=False)
    assert off.grammar_backend is None
    with pytest.raises(ValueError, match="guided decoding is off"):
        off.add_request("a", prompt(demo[1], 0), SamplingParams(), constraint=c)
    with pytest.raises(ValueError, match="ignore_eos"):
        engine.add_request("b", prompt(demo[1], 0), SamplingParams(ignore_eos=True), constraint=c)
