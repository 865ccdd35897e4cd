"""The OpenAI-compatible HTTP API through a real ``kimi-grpc serve --http-port`` (demo checkpoint,
CPU), driven by the official ``openai`` client (``max_retries=0``) and raw HTTP (httpx).

Equivalence is the backbone: a chat completion is one AgentStep, so streamed == non-stream ==
the gRPC AgentStep for the same input (greedy), for reasoning, content and tool calls; the
thinking switches give the prompt tokens of gRPC's INSTANT rendering (checked with Tokenize).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import jsonschema
import openai
import pytest

from kimi_grpc.client import KimiClient
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.server_harness import ServerProcess, running_server

MODEL = "kimi-grpc-demo"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
NO_THINKING = {"thinking": {"type": "disabled"}}
DEEP_SCHEMA: dict = {"type": "object"}
for _ in range(300):  # deeper than the grammar engine's recursion limit
    DEEP_SCHEMA = {"type": "object", "properties": {"a": DEEP_SCHEMA}}


@pytest.fixture(scope="module")
def tokenizer() -> KimiTokenizer:
    return KimiTokenizer.from_dir(demo_tokenizer_dir())


@pytest.fixture(scope="module")
def closing_bias(tokenizer: KimiTokenizer) -> dict[str, float]:
    """Keeps a random model's JSON short (the grammar still decides what is valid)."""
    bias = {tokenizer.encode(t)[0]: 12.0 for t in ('"', "}", "]", ",")}
    for name in ("<|tool_call_end|>", "<|tool_calls_section_end|>", "<|im_end|>"):
        bias[tokenizer.token_id(name)] = 12.0
    return {str(k): v for k, v in bias.items()}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    with running_server("--http-port", "0", "--max-num-seqs", "64") as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.http_base, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> KimiClient:
    with KimiClient(server.target) as client:
        yield client


def chat(oai: openai.OpenAI, **kwargs):
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", USER)
    kwargs.setdefault("temperature", 0)
    return oai.chat.completions.create(**kwargs)


def folded_stream(oai: openai.OpenAI, **kwargs) -> dict:
    """Concatenates a stream's deltas the way a careful client does (by tool-call index)."""
    out = {"reasoning": "", "content": "", "calls": {}, "finish": [], "usage": None, "ids": set()}
    for chunk in chat(oai, stream=True, **kwargs):
        out["ids"].add((chunk.id, chunk.created, chunk.model))
        if chunk.usage is not None:
            assert chunk.choices == []
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            out["content"] += delta.content or ""
            for call in delta.tool_calls or ():
                entry = out["calls"].setdefault(call.index, {"id": None, "name": None, "args": ""})
                if call.id is not None:
                    assert entry["id"] is None, "a call's id came twice"
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["args"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                out["finish"].append(choice.finish_reason)
    return out


def grpc_step(grpc_client: KimiClient, messages=USER, **kwargs) -> pb.AgentStepFinal:
    return grpc_client.agent_step_result(messages, **kwargs).final


# ---- models, shapes, framing -----------------------------------------------------------------
def test_models_list_and_retrieve(oai: openai.OpenAI, server: ServerProcess) -> None:
    models = oai.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL and all(m.object == "model" for m in models.data)
    card = oai.models.retrieve(MODEL)
    assert card.id == MODEL and card.context_length > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_non_stream_shape(oai: openai.OpenAI) -> None:
    r = chat(oai, max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert isinstance(r.created, int) and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 8
    assert r._request_id  # x-request-id reached the client


def test_stream_equals_non_stream_equals_grpc(oai: openai.OpenAI, grpc_client: KimiClient) -> None:
    """Thinking mode (reasoning + content) at temperature 0."""
    whole = chat(oai, max_tokens=24)
    streamed = folded_stream(oai, max_tokens=24, stream_options={"include_usage": True})
    final = grpc_step(grpc_client, params={"temperature": 0.0, "max_tokens": 24})
    message = whole.choices[0].message
    assert len(streamed["ids"]) == 1  # one id/created/model on every chunk
    assert streamed["finish"] == [whole.choices[0].finish_reason]
    assert streamed["reasoning"] == message.reasoning_content == final.message.reasoning_content
    assert streamed["content"] == (message.content or "") == final.message.content
    assert streamed["reasoning"]  # thinking is the default: there is reasoning to compare
    assert streamed["usage"].completion_tokens == whole.usage.completion_tokens
    assert whole.usage.completion_tokens == final.usage.completion_tokens
    assert whole.usage.prompt_tokens == final.usage.prompt_tokens
    assert whole.usage.completion_tokens_details.reasoning_tokens == final.usage.reasoning_tokens


def test_tool_calls_stream_equals_non_stream_equals_grpc(
    oai: openai.OpenAI, grpc_client: KimiClient, closing_bias: dict[str, float]
) -> None:
    kwargs = dict(
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=64,
        logit_bias=closing_bias,
        extra_body=NO_THINKING,
    )
    whole = chat(oai, **kwargs)
    streamed = folded_stream(oai, **kwargs)
    final = grpc_step(
        grpc_client,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        mode="instant",
        params={"temperature": 0.0, "max_tokens": 64, "logit_bias": closing_bias},
    )
    calls = whole.choices[0].message.tool_calls
    assert calls and whole.choices[0].finish_reason == "tool_calls"
    assert streamed["finish"] == ["tool_calls"]
    expected = [(c.id, c.name, c.arguments) for c in final.message.tool_calls]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == expected
    folded = [streamed["calls"][i] for i in sorted(streamed["calls"])]
    assert [(c["id"], c["name"], c["args"]) for c in folded] == expected
    for call in calls:  # guided decoding: valid for the declared schema
        schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])
        assert call.id.startswith(f"functions.{call.function.name}:")


def test_stream_helper_final_completion_matches(
    oai: openai.OpenAI, closing_bias: dict[str, float]
) -> None:
    """openai's accumulator concatenates repeated strings: a repeated id/name would show here."""
    kwargs = dict(
        model=MODEL,
        messages=USER,
        temperature=0,
        tools=[WEATHER],
        max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=closing_bias,
        extra_body=NO_THINKING,
    )
    whole = oai.chat.completions.create(**kwargs)
    with oai.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    got, want = final.choices[0].message, whole.choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in got.tool_calls] == [
        (c.id, c.function.name, c.function.arguments) for c in want.tool_calls
    ]
    assert got.tool_calls[0].function.name == "get_weather"
    assert got.tool_calls[0].id == "functions.get_weather:0"
    # A named tool_choice finishes "stop" (OpenAI's rule); auto/required give "tool_calls".
    assert whole.choices[0].finish_reason == final.choices[0].finish_reason == "stop"


def raw_events(server: ServerProcess, body: dict, headers: dict | None = None) -> list[str]:
    events = []
    with httpx.stream(
        "POST", f"{server.http_base}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("\n\n")
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(block[len("data: ") :])
    return events


def test_raw_sse_framing(server: ServerProcess) -> None:
    base = {"messages": USER, "max_tokens": 6, "stream": True, "temperature": 0}
    for include_usage in (False, True):
        events = raw_events(server, {**base, "stream_options": {"include_usage": include_usage}})
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [f for f in finishes if f is not None] == ["length"]
        usage_chunks = [c for c in chunks if c.get("usage")]
        assert len(usage_chunks) == int(include_usage)
        if include_usage:
            assert chunks[-1] is usage_chunks[0] and chunks[-1]["choices"] == []
        for chunk in chunks:  # reasoning never goes out as "" (kosong would make an empty part)
            for choice in chunk["choices"]:
                assert choice["delta"].get("reasoning_content") != ""


def test_x_request_id_on_every_response(server: ServerProcess) -> None:
    base = server.http_base
    ok = httpx.get(f"{base}/models")
    missing = httpx.get(f"{base}/nope")
    bad = httpx.post(f"{base}/chat/completions", content=b"{not json")
    mine = httpx.get(f"{base}/models", headers={"x-request-id": "trace-42"})
    for response in (ok, missing, bad):
        assert len(response.headers["x-request-id"]) >= 16
    assert mine.headers["x-request-id"] == "trace-42"
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    health = httpx.get(base.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.headers["x-request-id"]


# ---- request mapping ---------------------------------------------------------------------------
def test_thinking_switches_match_grpc_instant(oai: openai.OpenAI, grpc_client: KimiClient) -> None:
    def tokens(mode: int) -> int:
        chat_input = pb.ChatInput(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=USER[0]["content"])], mode=mode
        )
        return len(grpc_client.tokenize(pb.TokenizeRequest(chat=chat_input)).token_ids)

    instant, thinking = tokens(pb.MODE_INSTANT), tokens(pb.MODE_THINKING)
    assert instant != thinking
    offs = (
        {"thinking": {"type": "disabled"}},
        {"chat_template_kwargs": {"thinking": False}},
        {"reasoning_effort": "none"},
    )
    for extra in offs:
        r = chat(oai, max_tokens=8, extra_body=extra)
        message = r.choices[0].message
        assert getattr(message, "reasoning_content", None) is None, extra
        assert r.usage.prompt_tokens == instant, extra
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
    default = chat(oai, max_tokens=8)
    assert default.usage.prompt_tokens == thinking
    assert chat(oai, max_tokens=8, extra_body={"reasoning_effort": None}).usage.prompt_tokens == (
        thinking
    )  # null = no preference
    with pytest.raises(openai.BadRequestError) as err:  # contradicting switches
        chat(
            oai,
            extra_body={
                "thinking": {"type": "enabled"},
                "chat_template_kwargs": {"thinking": False},
            },
        )
    assert err.value.param == "chat_template_kwargs.thinking"


def test_history_forms_are_accepted(oai: openai.OpenAI, grpc_client: KimiClient) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
    }
    history = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": None, "reasoning": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "call_abc",
            "content": [{"type": "text", "text": "sunny"}],
        },
        {
            "role": "assistant",
            "content": [],
            "reasoning_content": "done",
            "tool_calls": [{**call, "id": "x"}],
        },
        {"role": "tool", "tool_call_id": "x", "content": "rainy"},
        {"role": "user", "content": "thanks"},
    ]
    r = chat(oai, messages=history, tools=[WEATHER], max_tokens=4, extra_body=NO_THINKING)
    same = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        {"role": "assistant", "reasoning_content": "done", "tool_calls": [{**call, "id": "x"}]},
        {"role": "tool", "tool_call_id": "x", "content": "rainy"},
        {"role": "user", "content": "thanks"},
    ]
    final = grpc_step(
        grpc_client,
        same,
        tools=[WEATHER],
        mode="instant",
        params={"temperature": 0.0, "max_tokens": 4},
    )
    assert r.usage.prompt_tokens == final.usage.prompt_tokens
    assert (r.choices[0].message.content or "") == final.message.content


def test_tool_choice_forms(oai: openai.OpenAI, closing_bias: dict[str, float]) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "functions.get_time:0",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_time:0", "content": "noon"},
    ]
    named = chat(
        oai,
        messages=history,
        tools=[WEATHER, CLOCK],
        max_tokens=64,
        logit_bias=closing_bias,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body=NO_THINKING,
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id == "functions.get_weather:1"
    none = chat(oai, tools=[WEATHER], tool_choice="none", max_tokens=16, logit_bias=closing_bias)
    assert none.choices[0].message.tool_calls is None
    serial = chat(
        oai,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        logit_bias=closing_bias,
        extra_body=NO_THINKING,
    )
    assert len(serial.choices[0].message.tool_calls) == 1


def test_response_formats_are_enforced(
    oai: openai.OpenAI, closing_bias: dict[str, float], tokenizer: KimiTokenizer
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    r = chat(
        oai, response_format=fmt, max_tokens=48, logit_bias=closing_bias, extra_body=NO_THINKING
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Any object: a random model writes keys forever unless "}" is likelier than opening a key
    # (the grammar still refuses "}" anywhere but where an object may close).
    close = {str(tokenizer.encode(t)[0]): v for t, v in (("}", 30.0), ('"', -30.0), ('{"', -30.0))}
    close[str(tokenizer.token_id("<|im_end|>"))] = 30.0
    r = chat(
        oai,
        response_format={"type": "json_object"},
        max_tokens=64,
        logit_bias=close,
        extra_body=NO_THINKING,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_chat_logprobs(oai: openai.OpenAI, tokenizer: KimiTokenizer) -> None:
    r = chat(oai, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=NO_THINKING)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # Greedy: the sampled token is the most likely one.
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)
    streamed = [
        lp
        for chunk in chat(
            oai, max_tokens=6, logprobs=True, top_logprobs=3, stream=True, extra_body=NO_THINKING
        )
        for choice in chunk.choices
        if choice.logprobs
        for lp in choice.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


# ---- /v1/completions -----------------------------------------------------------------------------
def test_completions_text_ids_and_special_tokens(
    oai: openai.OpenAI, grpc_client: KimiClient, tokenizer: KimiTokenizer
) -> None:
    prompt = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ids = tokenizer.encode(prompt, allow_special=True)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    grpc = grpc_client.generate_result(
        prompt, {"max_tokens": 8, "temperature": 0.0}, allow_special_tokens=True
    )
    assert r.choices[0].text == grpc.text
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == grpc.text
    several = oai.completions.create(
        model=MODEL, prompt=[ids, "other"], max_tokens=4, temperature=0
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == tokenizer.decode(grpc.token_ids[:4], skip_special_tokens=True)
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == grpc.text
    lp = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 3
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    echo = oai.completions.create(
        model=MODEL, prompt="hello", max_tokens=2, temperature=0, echo=True
    )
    assert echo.choices[0].text.startswith("hello")


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": -1}, "temperature"),
        ({"messages": USER, "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"messages": USER, "tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
        (
            {
                "messages": USER,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
                "tools": [WEATHER],
            },
            "tool_choice.function.name",
        ),
        (
            {
                "messages": USER,
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"a": {"type": "string", "pattern": "("}},
                            },
                        },
                    }
                ],
            },
            "tools[0].function.parameters",
        ),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "wav"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
        ({"messages": USER, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": USER, "thinking": {"type": "maybe"}}, "thinking.type"),
        ({"messages": USER, "stop": [1]}, "stop"),
        ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": USER, "prompt_cache_key": "k" * 300}, "prompt_cache_key"),
        # Numbers beyond the proto's integer widths are 400s, not 500s.
        ({"messages": USER, "top_k": 2**31}, "top_k"),
        ({"messages": USER, "min_tokens": 2**31}, "min_tokens"),
        ({"messages": USER, "stop_token_ids": [2**32]}, "stop_token_ids[0]"),
        ({"messages": USER, "thinking": {"budget_tokens": 2**31}}, "thinking.budget_tokens"),
        ({"messages": USER, "logit_bias": {"99999999999": 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"²": 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"5": None}}, "logit_bias.5"),
        (
            {
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "deep", "schema": DEEP_SCHEMA},
                },
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    server: ServerProcess, body: dict, param: str
) -> None:
    response = httpx.post(f"{server.http_base}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"].startswith(param)


def test_error_classes_through_the_client(oai: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, temperature="hot")
    assert err.value.param == "temperature" and err.value.status_code == 400
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    refused = httpx.post(f"{server.http_base}/chat/completions", content=surrogate)
    assert refused.status_code == 400 and "surrogate" in refused.json()["error"]["message"]
    bad_json = httpx.post(f"{server.http_base}/chat/completions", content=b"{")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        chat(oai, model="gpt-4o")
    assert err.value.code == "model_not_found"
    odd_model = b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}'
    assert httpx.post(f"{server.http_base}/chat/completions", content=odd_model).status_code == 404
    route = httpx.post(f"{server.http_base}/responses", json={})  # the Responses API: absent
    assert route.status_code == 404 and route.json()["error"]["code"] == "unknown_route"


def test_min_tokens_span_the_turn(oai: openai.OpenAI) -> None:
    """min_tokens counts the whole turn across the thinking budget's phases."""
    r = chat(
        oai,
        max_tokens=50,
        extra_body={"min_tokens": 48, "thinking": {"type": "enabled", "budget_tokens": 5}},
    )
    assert r.usage.completion_tokens >= 48


def test_completions_response_format(oai: openai.OpenAI, tokenizer: KimiTokenizer) -> None:
    close = {str(tokenizer.encode(t)[0]): v for t, v in (("}", 30.0), ('"', -30.0), ('{"', -30.0))}
    close[str(tokenizer.token_id("<|im_end|>"))] = 30.0
    r = oai.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=32,
        temperature=0,
        logit_bias=close,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(r.choices[0].text), dict)


# ---- cancellation and load ---------------------------------------------------------------------
def wait_idle(client: KimiClient, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        status = client.server_status()
        if status.running == status.waiting == status.kv_pages_used == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"still busy after {within} s: {client.server_status()}")


def test_closing_a_stream_aborts_the_request(oai: openai.OpenAI, grpc_client: KimiClient) -> None:
    wait_idle(grpc_client, 30)
    stream = chat(oai, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert grpc_client.server_status().running == 1
    stream.close()
    assert wait_idle(grpc_client, 1.0) < 1.0


def test_a_client_giving_up_aborts_a_non_stream_request(
    server: ServerProcess, grpc_client: KimiClient
) -> None:
    wait_idle(grpc_client, 30)
    impatient = openai.OpenAI(base_url=server.http_base, api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, max_tokens=3000, extra_body={"ignore_eos": True})
    assert wait_idle(grpc_client, 1.5) < 1.5  # the 0.5 s client timeout + under a second


def test_grpc_keeps_serving_during_http_load(oai: openai.OpenAI, grpc_client: KimiClient) -> None:
    results, errors = [], []

    def http_stream() -> None:
        try:
            results.append(folded_stream(oai, max_tokens=40, extra_body={"ignore_eos": True}))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=http_stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    grpc_results = [
        grpc_client.generate_result("grpc while http", {"max_tokens": 8, "ignore_eos": True})
        for _ in range(4)
    ]
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 8
    assert all(r.final.usage.completion_tokens == 8 for r in grpc_results)


# ---- keys, admission, drain (servers of their own) -----------------------------------------------
def test_api_keys_and_admission(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("secret-1\n")
    args = (
        "--http-port",
        "0",
        "--api-key-file",
        str(keys),
        "--max-num-seqs",
        "1",
        "--max-queued-requests",
        "0",
        "--max-model-len",
        "512",
    )
    with running_server(*args) as srv:
        health = httpx.get(srv.http_base.removesuffix("/v1") + "/health")
        assert health.status_code == 200  # probes need no key
        wrong = openai.OpenAI(base_url=srv.http_base, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            chat(wrong, max_tokens=2)
        good = openai.OpenAI(base_url=srv.http_base, api_key="secret-1", max_retries=0)
        assert good.models.list().data
        stream = chat(good, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # holds the only slot
        with pytest.raises(openai.RateLimitError) as err:
            chat(good, max_tokens=2)
        assert int(err.value.response.headers["retry-after"]) >= 1
        stream.close()
        with KimiClient(srv.target, api_key="secret-1") as client:
            wait_idle(client, 1.0)
        assert chat(good, max_tokens=2).usage.completion_tokens <= 2  # the slot is free again
        # --max-model-len 512: a longer prompt is refused in the words kimi-cli looks for; a
        # max_tokens beyond the room left is clamped instead.
        with pytest.raises(openai.BadRequestError) as err:
            chat(good, messages=[{"role": "user", "content": "x " * 600}])
        assert "maximum context length" in err.value.message
        assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
        also_min = chat(
            good, max_tokens=200_000, extra_body={"ignore_eos": True, "min_tokens": 100_000}
        )
        assert also_min.usage.total_tokens == 512  # min_tokens is clamped with max_tokens
        clamped = chat(  # max_completion_tokens wins over max_tokens, then is clamped
            good, max_completion_tokens=100_000, max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert clamped.choices[0].finish_reason == "length"
        assert clamped.usage.total_tokens == 512


def test_sigterm_drains_http_too() -> None:
    with running_server("--http-port", "0", "--drain-timeout", "1") as srv:
        url = f"{srv.http_base}/chat/completions"
        body = {"messages": USER, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            srv.wait_for("draining")
            late = openai.OpenAI(base_url=srv.http_base, api_key="x", max_retries=0)
            with pytest.raises(openai.InternalServerError) as err:
                chat(late, max_tokens=2)
            assert err.value.status_code == 503
            assert int(err.value.response.headers["retry-after"]) >= 1
            health = httpx.get(srv.http_base.removesuffix("/v1") + "/health", timeout=10)
            assert health.status_code == 503
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "aborted"  # the drain timeout cut it: an error event, then DONE
        assert srv.proc.wait(timeout=30) == 0
    with pytest.raises(grpc.RpcError):
        srv.health()


def test_while_loading_every_route_is_503_with_retry_after() -> None:
    from starlette.testclient import TestClient

    from kimi_grpc.http.app import HttpApi
    from kimi_grpc.server.runtime import Runtime
    from kimi_grpc.server.servicer import InferenceServicer

    runtime = Runtime(max_queued_requests=1)  # no model attached yet: still loading
    client = TestClient(HttpApi(runtime, InferenceServicer(runtime)).app)
    responses = (
        client.get("/health"),
        client.get("/v1/models"),
        client.post("/v1/chat/completions", json={"messages": USER}),
        client.post("/v1/completions", json={"prompt": "hi"}),
    )
    for response in responses:
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "loading" in response.json()["error"]["message"]
