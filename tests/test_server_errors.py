"""The validation table: every bad input gets its status code and a message naming the field, and
the server keeps serving afterwards. One test per row (parametrized)."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kimi_grpc.client import KimiClient, agent_step_request, generate_request
from kimi_grpc.proto import inference_pb2 as pb
from tests.server_harness import ServerProcess, start_server

MAX_MODEL_LEN = 256
INVALID = grpc.StatusCode.INVALID_ARGUMENT
USER = [{"role": "user", "content": "hi"}]
KW = "chat_template_kwargs_json"
NO_THINK = {"thinking": False}
TOOL = {"name": "f", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    srv = start_server("--max-model-len", str(MAX_MODEL_LEN), "--max-message-mb", "8")
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> KimiClient:
    with KimiClient(server.target) as c:
        yield c


def gen(**sampling) -> pb.GenerateRequest:
    return generate_request("hello", sampling)


def step(messages=USER, **kwargs) -> pb.AgentStepRequest:
    return agent_step_request(messages, **kwargs)


def raw_step(**fields) -> pb.AgentStepRequest:
    return pb.AgentStepRequest(messages=step().messages, **fields)


# (id, rpc, request, field path named in the status)
GENERATE_ROWS = [
    ("temperature<0", gen(temperature=-0.5), "sampling.temperature"),
    ("top_p=0", gen(top_p=0.0), "sampling.top_p"),
    ("top_p>1", gen(top_p=1.5), "sampling.top_p"),
    ("top_k<-1", gen(top_k=-2), "sampling.top_k"),
    ("min_p>1", gen(min_p=2.0), "sampling.min_p"),
    ("presence>2", gen(presence_penalty=3.0), "sampling.presence_penalty"),
    ("frequency<-2", gen(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    ("repetition=0", gen(repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("seed<0", gen(seed=-1), "sampling.seed"),
    ("n=0", gen(n=0), "sampling.n"),
    ("n=17", gen(n=17), "sampling.n"),
    ("max_tokens=0", gen(max_tokens=0), "sampling.max_tokens"),
    ("min>max", gen(max_tokens=2, min_tokens=3), "sampling.min_tokens"),
    ("min_tokens<0", gen(min_tokens=-1), "sampling.min_tokens"),
    ("logprobs>20", gen(logprobs=21), "sampling.logprobs"),
    ("empty stop", gen(stop=[""]), "sampling.stop"),
    ("17 stops", gen(stop=[f"s{i}" for i in range(17)]), "sampling.stop"),
    ("bias>100", gen(logit_bias={5: 200.0}), "sampling.logit_bias"),
    ("bias id", gen(logit_bias={10**6: 1.0}), "sampling.logit_bias"),
    ("stop id", gen(stop_token_ids=[10**6]), "sampling.stop_token_ids"),
    ("no input", pb.GenerateRequest(), "input"),
    ("empty ids", pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids"),
    ("empty text", pb.GenerateRequest(text=""), "text"),
    ("oov id", generate_request([1, 2, 10**6]), "token_ids.ids"),
    ("over context", generate_request([5] * (MAX_MODEL_LEN + 1)), "token_ids.ids"),
    ("prompt+max", generate_request([5] * 200, {"max_tokens": 100}), "sampling.max_tokens"),
    ("long id", generate_request("x", request_id="r" * 300), "request_id"),
    ("long session", generate_request("x", session_id="s" * 300), "session_id"),
]
AGENT_ROWS = [
    ("no messages", pb.AgentStepRequest(), "messages"),
    ("role unset", pb.AgentStepRequest(messages=[pb.ChatMessage(content="x")]), "messages[0]"),
    ("tool w/o id", step([*USER, {"role": "tool", "content": "r"}]), "messages[1].tool_call_id"),
    (
        "unknown call id",
        step([*USER, {"role": "tool", "tool_call_id": "nope", "content": "r"}]),
        "messages[1].tool_call_id",
    ),
    ("user reasoning", step([{**USER[0], "reasoning_content": "r"}]), "messages[0].reasoning"),
    ("unknown tool_choice", step(tools=[TOOL], tool_choice_="g"), "tool_choice.function_name"),
    ("required w/o tools", step(tool_choice_="required"), "tool_choice"),
    ("agent w/o tools", step(mode="agent"), "tools"),
    ("bad schema json", raw_step(tools=[pb.Tool(name="f", parameters_json="{")]), "tools[0]"),
    ("schema not object", raw_step(tools=[pb.Tool(name="f", parameters_json="[1]")]), "tools[0]"),
    ("bad tool name", raw_step(tools=[pb.Tool(name="no spaces")]), "tools[0]"),
    ("duplicate tools", raw_step(tools=[pb.Tool(name="f"), pb.Tool(name="f")]), "tools[1]"),
    ("n=2", step(params={"n": 2}), "sampling.n"),
    ("budget<0", step(thinking_budget=-1), "thinking_budget"),
    ("kwargs json", raw_step(chat_template_kwargs_json="{x"), "chat_template_kwargs_json"),
    ("sampling", step(params={"temperature": -1.0}), "sampling.temperature"),
    ("long session", step(session_id="s" * 300), "session_id"),
    ("thinking vs mode", step(mode="thinking", chat_template_kwargs=NO_THINK), f"{KW}.thinking"),
    ("thinking type", step(chat_template_kwargs={"enable_thinking": 1}), f"{KW}.enable_thinking"),
    ("reserved kwarg", step(chat_template_kwargs={"messages": []}), f"{KW}.messages"),
]  # fmt: skip


def _field_of(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None, "INVALID_ARGUMENT carries a BadRequest detail"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


def _expect_invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == INVALID, err.value.details()
    assert _field_of(err.value).startswith(field), (_field_of(err.value), field)
    assert field in err.value.details()


def _rows(rows: list[tuple]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        ("request_", "field"), [r[1:] for r in rows], ids=[r[0] for r in rows]
    )


@_rows(GENERATE_ROWS)
def test_generate_rejects(client: KimiClient, request_: pb.GenerateRequest, field: str) -> None:
    _expect_invalid(lambda: list(client.stub.Generate(request_)), field)


@_rows(AGENT_ROWS)
def test_agent_step_rejects(client: KimiClient, request_: pb.AgentStepRequest, field: str) -> None:
    _expect_invalid(lambda: list(client.stub.AgentStep(request_)), field)


def test_tokenize_rejects_missing_input(client: KimiClient) -> None:
    _expect_invalid(lambda: client.tokenize(pb.TokenizeRequest()), "input")
    bad_chat = pb.TokenizeRequest(chat=pb.ChatInput())
    _expect_invalid(lambda: client.tokenize(bad_chat), "chat.messages")


def test_duplicate_in_flight_request_id(client: KimiClient) -> None:
    stream = client.generate("a", {"max_tokens": 200, "ignore_eos": True}, request_id="dup")
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.generate_result("b", {"max_tokens": 2}, request_id="dup")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.cancel()


def test_invalid_utf8_in_a_string_field(server: ServerProcess) -> None:
    # GenerateRequest field 2 (text), wire type 2, two bytes that are not UTF-8.
    payload = b"\x12\x02\xff\xfe"
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(
            "/kimi.v1.InferenceService/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call(payload))
        assert err.value.code() == INVALID
        assert "invalid UTF-8" in err.value.details()
        tokenize = channel.unary_unary(
            "/kimi.v1.InferenceService/Tokenize",
            request_serializer=lambda b: b,
            response_deserializer=pb.TokenizeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            tokenize(b"\x0a\x01\xc0")
        assert err.value.code() == INVALID


def test_100_mb_request_is_refused_before_the_handler(client: KimiClient) -> None:
    huge = generate_request("a" * (100 * 1024 * 1024), {"max_tokens": 1})
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(huge))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_keeps_serving_after_every_bad_input(client: KimiClient) -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        for _, request_, _ in GENERATE_ROWS[:10]:
            try:
                list(client.stub.Generate(request_))
            except grpc.RpcError as exc:
                if exc.code() != INVALID:
                    errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = client.generate_result("still here", {"max_tokens": 3, "ignore_eos": True})
    assert result.final.usage.completion_tokens == 3
    assert client.server_status().kv_pages_used == 0
