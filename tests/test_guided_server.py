"""Guided decoding through a real ``kimi-grpc serve``: Generate and AgentStep response formats,
named tool calls, the per-request switch, bad schemas, and the status counters."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from kimi_grpc.client import KimiClient
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.server_harness import ServerProcess, running_server

ANSWER = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 2}},
    "required": ["ok", "tags"],
    "additionalProperties": False,
}
LOOKUP = {
    "name": "db.lookup-user",
    "parameters": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1}, "fields": {"enum": ["a", "b"]}},
        "required": ["id", "fields"],
    },
}
USER = [{"role": "user", "content": "Look up user 7."}]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> KimiClient:
    with KimiClient(server.target) as c:
        yield c


def closing_bias() -> dict[int, float]:
    """Keeps a random model's JSON short (the grammar still decides what is valid)."""
    tok = KimiTokenizer.from_dir(demo_tokenizer_dir())
    bias = {tok.encode(t)[0]: 12.0 for t in ('"', "}", "]", ",")}
    for name in ("<|tool_call_end|>", "<|tool_calls_section_end|>", "<|im_end|>"):
        bias[tok.token_id(name)] = 12.0
    return bias


def json_schema_format(schema: dict) -> pb.ResponseFormat:
    return pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema), name="answer"
    )


def test_generate_response_format_makes_every_completion_json(client: KimiClient) -> None:
    params = {"n": 3, "seed": 4, "max_tokens": 64, "logit_bias": closing_bias()}
    finals, texts = {}, {0: "", 1: "", 2: ""}
    for r in client.generate("Answer:", params, response_format=json_schema_format(ANSWER)):
        if r.HasField("final"):
            finals[r.final.index] = r.final
        else:
            texts[r.delta.index] += r.delta.text
    done = [i for i, f in finals.items() if f.finish_reason == pb.FINISH_REASON_STOP]
    assert len(done) >= 2
    for i in done:
        jsonschema.validate(json.loads(texts[i]), ANSWER)


def test_agent_step_named_tool_and_json_content(client: KimiClient) -> None:
    named = client.agent_step_result(
        USER, tools=[LOOKUP], tool_choice="db.lookup-user", mode="instant",
        params={"max_tokens": 64, "temperature": 1.0, "seed": 1, "logit_bias": closing_bias()},
    )  # fmt: skip
    assert named.final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    (call,) = named.final.message.tool_calls
    assert (call.id, call.name) == ("functions.db.lookup-user:0", "db.lookup-user")
    jsonschema.validate(json.loads(call.arguments), LOOKUP["parameters"])
    assert not named.final.parse_errors
    answer = client.agent_step_result(
        USER, mode="thinking", thinking_budget=2, response_format=json_schema_format(ANSWER),
        params={"max_tokens": 256, "temperature": 0.0, "logit_bias": closing_bias()},
    )  # fmt: skip
    assert answer.final.finish_reason == pb.FINISH_REASON_STOP
    # The budget forced </think> after 2 reasoning tokens; the grammar took over after it.
    assert answer.final.usage.reasoning_tokens == 2
    jsonschema.validate(json.loads(answer.final.message.content), ANSWER)


def test_guided_decoding_can_be_turned_off_per_request(client: KimiClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.agent_step_result(
            USER, guided_decoding=False, response_format=json_schema_format(ANSWER),
            params={"max_tokens": 4},
        )  # fmt: skip
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "response_format" in err.value.details()
    before = client.server_status().guided_decoding.constrained_requests
    result = client.agent_step_result(
        USER, tools=[LOOKUP], guided_decoding=False, mode="instant", params={"max_tokens": 8}
    )
    assert result.final is not None
    assert client.server_status().guided_decoding.constrained_requests == before


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}, "tools[0]"),
        ({"type": "object", "properties": {"a": {"type": "wat"}}}, "tools[0]"),
    ],
)
def test_a_schema_the_engine_cannot_compile_is_invalid_argument(
    client: KimiClient, schema: dict, field: str
) -> None:
    bad = {"name": "f", "parameters": schema}
    with pytest.raises(grpc.RpcError) as err:
        client.agent_step_result(USER, tools=[bad], mode="instant", params={"max_tokens": 4})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_lenient_fallback_is_counted_and_status_reports_guided_decoding(
    client: KimiClient,
) -> None:
    before = client.server_status().guided_decoding
    assert before.enabled
    lenient = {
        "name": "tag",
        "parameters": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
            },
        },
    }
    result = client.agent_step_result(
        USER, tools=[lenient], mode="instant", params={"max_tokens": 4}
    )
    assert result.final is not None
    after = client.server_status().guided_decoding
    assert after.lenient_fallbacks == before.lenient_fallbacks + 1
    assert after.constrained_requests == before.constrained_requests + 1
    assert after.masks > before.masks and after.mask_seconds > before.mask_seconds
    assert after.rejected_tokens == 0
