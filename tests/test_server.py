"""The gRPC service against a real server process (demo checkpoint, CPU): streaming, usage,
offline equality, cancellation, queue limits, Tokenize / info RPCs, reflection and metrics."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from kimi_grpc.client import AsyncKimiClient, KimiClient, agent_step_request
from kimi_grpc.engine.llm import LLM
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.sampling_params import SamplingParams
from tests.server_harness import ServerProcess, running_server, start_server

MAX_MODEL_LEN = 512
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    srv = start_server("--max-model-len", str(MAX_MODEL_LEN), "--metrics-port", "0")
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> KimiClient:
    with KimiClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(max_model_len=MAX_MODEL_LEN)


def wait_pages_baseline(client: KimiClient, baseline: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        used = client.server_status().kv_pages_used
        if used == baseline or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


# ---- lifecycle ----------------------------------------------------------------------------------
def test_health_not_serving_until_loaded_then_serving() -> None:
    with running_server(wait_ready=False) as srv:
        first = srv.health()  # the model is still loading
        assert first == NOT_SERVING
        with KimiClient(srv.target) as c, pytest.raises(grpc.RpcError) as err:
            c.generate_result("hello", {"max_tokens": 2})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in err.value.details()
        srv.wait_for("kimi-grpc serving on")
        assert srv.health() == SERVING
        assert srv.health("kimi.v1.InferenceService") == SERVING
        with pytest.raises(grpc.RpcError) as err:
            srv.health("no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---- Generate -----------------------------------------------------------------------------------
def test_generate_stream_adds_up(client: KimiClient, offline: LLM) -> None:
    params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    deltas, final = [], None
    for response in client.generate("The quick brown fox", params, request_id="adds-up"):
        if response.HasField("final"):
            final = response.final
        else:
            deltas.append(response.delta)
    ids = [t for d in deltas for t in d.token_ids]
    text = "".join(d.text for d in deltas)
    assert final.request_id == "adds-up"
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == len(ids) == 24
    tokenizer = offline.tokenizer
    assert final.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    want = offline.generate(["The quick brown fox"], SamplingParams(**params))[0]
    assert ids == want.token_ids
    assert final.timings.e2e_ms >= final.timings.time_to_first_token_ms > 0
    assert 0 <= final.timings.queue_ms <= final.timings.time_to_first_token_ms


def test_generate_stream_interval_groups_tokens(client: KimiClient) -> None:
    params = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}

    def deltas(**fields) -> list:
        stream = client.generate([5, 6, 7], params, **fields)
        return [r.delta for r in stream if r.HasField("delta")]

    plain, grouped = deltas(), deltas(stream_interval=4)
    assert [len(d.token_ids) for d in grouped] == [4, 4, 2]
    assert [t for d in grouped for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    assert "".join(d.text for d in grouped) == "".join(d.text for d in plain)


def test_generate_token_ids_logprobs_stop_and_cached_tokens(client: KimiClient) -> None:
    prompt = list(range(10, 200))  # 190 tokens: two full pages and a partial one
    params = {"max_tokens": 8, "temperature": 0.0, "logprobs": 2, "ignore_eos": True}
    first = client.generate_result(prompt, params)
    second = client.generate_result(prompt, params)
    assert first.token_ids == second.token_ids
    # The repeated prompt: everything but its last token (two whole pages, then the first
    # request's partly filled third page, taken over: a partial hit).
    assert second.final.usage.cached_tokens == 189
    stop_id = first.token_ids[3]
    stopped = client.generate_result(prompt, {**params, "stop_token_ids": [stop_id]})
    assert stopped.final.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.final.stop_token_id == stop_id
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop_id) + 1]
    with_logprobs = next(
        r for r in client.generate(prompt, params) if r.HasField("delta") and r.delta.token_ids
    )
    (lp,) = with_logprobs.delta.logprobs
    assert lp.token_id == with_logprobs.delta.token_ids[0] and len(lp.top_logprobs) == 2
    assert lp.logprob <= 0


def test_generate_n_completions_each_get_a_final(client: KimiClient) -> None:
    finals = [
        r.final
        for r in client.generate("hi", {"n": 3, "max_tokens": 4, "seed": 7, "ignore_eos": True})
        if r.HasField("final")
    ]
    assert sorted(f.index for f in finals) == [0, 1, 2]
    assert all(f.usage.completion_tokens == 4 for f in finals)


# ---- AgentStep ----------------------------------------------------------------------------------
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _check_agent_stream(responses: list[pb.AgentStepResponse]) -> pb.AgentStepFinal:
    *deltas, last = responses
    assert last.HasField("final") and all(r.HasField("delta") for r in deltas)
    final = last.final
    reasoning = "".join(r.delta.reasoning for r in deltas)
    content = "".join(r.delta.content for r in deltas)
    ids = [t for r in deltas for t in r.delta.token_ids]
    calls: dict[int, dict] = {}
    for r in deltas:
        for c in r.delta.tool_calls:
            entry = calls.setdefault(c.index, {"id": c.id, "name": c.name, "arguments": ""})
            entry["arguments"] += c.arguments
    msg = final.message
    assert msg.role == pb.ROLE_ASSISTANT
    assert reasoning == msg.reasoning_content
    assert content == msg.content
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in msg.tool_calls
    ]
    assert len(ids) == final.usage.completion_tokens
    assert final.usage.reasoning_tokens <= final.usage.completion_tokens
    return final


@pytest.mark.parametrize("mode", ["instant", "thinking"])
def test_agent_step_stream_equals_final(client: KimiClient, mode: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    responses = list(
        client.agent_step(messages, mode=mode, params={"max_tokens": 24, "temperature": 0.0})
    )
    final = _check_agent_stream(responses)
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    if mode == "instant":
        assert final.usage.reasoning_tokens == 0 and not final.message.reasoning_content
    tokens = client.tokenize(
        pb.TokenizeRequest(
            chat=pb.ChatInput(
                messages=agent_step_request(messages).messages,
                mode=pb.MODE_INSTANT if mode == "instant" else pb.MODE_THINKING,
            )
        )
    )
    assert final.usage.prompt_tokens == len(tokens.token_ids)
    assert tokens.text.endswith("<|im_assistant|>assistant<|im_middle|>" + (
        "<think></think>" if mode == "instant" else "<think>"
    ))  # fmt: skip


def test_thinking_switch_in_template_kwargs_selects_instant(client: KimiClient) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    alias = client.agent_step_result(
        messages, mode="thinking", params=params, chat_template_kwargs={"thinking": True}
    )
    plain = client.agent_step_result(messages, mode="thinking", params=params)
    assert alias.token_ids == plain.token_ids
    request = agent_step_request(messages, params=params, chat_template_kwargs={"thinking": False})
    request.mode = pb.MODE_UNSPECIFIED
    responses = list(client.stub.AgentStep(request))
    instant = client.agent_step_result(messages, mode="instant", params=params)
    assert [t for r in responses[:-1] for t in r.delta.token_ids] == instant.token_ids
    assert responses[-1].final.usage.reasoning_tokens == 0


def test_thinking_budget_forces_end_of_reasoning(client: KimiClient) -> None:
    messages = [{"role": "user", "content": "Think hard."}]
    params = {"max_tokens": 20, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    responses = list(client.agent_step(messages, params=params, thinking_budget=5))
    final = _check_agent_stream(responses)
    assert final.usage.reasoning_tokens == 5
    ids = [t for r in responses[:-1] for t in r.delta.token_ids]
    think_end = client.tokenize(pb.TokenizeRequest(text="</think>", allow_special_tokens=True))
    assert ids[5] == think_end.token_ids[0]  # forced right after the budget
    assert final.usage.completion_tokens == 20


def test_named_tool_choice_forces_a_parsed_call(client: KimiClient) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for mode in ("instant", "agent"):
        responses = list(
            client.agent_step(
                messages,
                tools=[WEATHER],
                tool_choice="get_weather",
                mode=mode,
                thinking_budget=3,
                params={"max_tokens": 40, "temperature": 0.0},
            )
        )
        final = _check_agent_stream(responses)
        assert final.message.tool_calls[0].name == "get_weather"
        assert final.message.tool_calls[0].id == "functions.get_weather:0"


def test_tool_history_ids_are_normalised(client: KimiClient) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_x1", "name": "get_weather", "arguments": '{"city":"a"}'}],
        },
        {"role": "tool", "tool_call_id": "call_x1", "content": "sunny"},
    ]
    rendered = client.tokenize(
        pb.TokenizeRequest(
            chat=pb.ChatInput(
                messages=agent_step_request(messages).messages,
                tools=agent_step_request(messages, tools=[WEATHER]).tools,
            )
        )
    )
    assert "functions.get_weather:0" in rendered.text and "call_x1" not in rendered.text
    assert "## Return of functions.get_weather:0\nsunny" in rendered.text


# ---- concurrency, cancellation, queue -----------------------------------------------------------
PROMPTS = [f"Request number {i}: tell me about topic {i * 7 % 13}" for i in range(64)]


def test_64_concurrent_streams_match_offline_and_cancel_frees_pages(
    client: KimiClient, server: ServerProcess, offline: LLM
) -> None:
    params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    want = offline.generate(PROMPTS, SamplingParams(**params))
    baseline = wait_pages_baseline(client, 0)
    assert baseline == 0
    cancel = set(range(3, 64, 6))  # 10 streams cancelled mid-way

    async def run() -> dict[int, list[int] | str]:
        async with AsyncKimiClient(server.target) as c:

            async def one(i: int) -> list[int] | str:
                call = c.generate(
                    PROMPTS[i], params if i not in cancel else {**params, "max_tokens": 200}
                )
                ids: list[int] = []
                async for response in call:
                    ids.extend(response.delta.token_ids)
                    if i in cancel and len(ids) >= 4:
                        call.cancel()
                        return "cancelled"
                return ids

            results = await asyncio.gather(*(one(i) for i in range(64)))
            return dict(enumerate(results))

    results = asyncio.run(run())
    for i in range(64):
        if i in cancel:
            assert results[i] == "cancelled"
        else:
            assert results[i] == want[i].token_ids, i
    assert wait_pages_baseline(client, baseline) == baseline
    status = client.server_status()
    assert status.running == 0 and status.waiting == 0


def test_abort_rpc_ends_the_stream(client: KimiClient) -> None:
    params = {"max_tokens": 400, "ignore_eos": True}
    stream = client.generate("long one", params, request_id="to-abort")
    first = next(stream)
    assert first.HasField("delta")
    assert client.abort(["to-abort", "unknown-id"]) == ["to-abort"]
    finals = [r.final for r in stream if r.HasField("final")]
    assert finals[0].finish_reason == pb.FINISH_REASON_ABORT
    assert finals[0].usage.completion_tokens < 400
    assert wait_pages_baseline(client, 0) == 0
    again = client.generate_result("reused id", {"max_tokens": 2}, request_id="to-abort")
    assert again.final.usage.completion_tokens == 2


def test_deadline_exceeded_frees_pages(client: KimiClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate_result("slow", {"max_tokens": 400, "ignore_eos": True}, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_pages_baseline(client, 0) == 0


def test_queue_full_status_sequence() -> None:
    with running_server("--max-num-seqs", "1", "--max-queued-requests", "1") as srv:
        codes: list[grpc.StatusCode] = []
        details: list[grpc.RpcError] = []
        barrier = threading.Barrier(10)

        def call() -> None:
            with KimiClient(srv.target) as c:
                barrier.wait()
                try:
                    c.generate_result("x", {"max_tokens": 48, "ignore_eos": True})
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    details.append(exc)

        threads = [threading.Thread(target=call) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok, exhausted = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sorted(codes, key=lambda c: c.value) == [ok, ok] + [exhausted] * 8
        status = rpc_status.from_call(details[0])
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds >= 1
        with KimiClient(srv.target) as c:  # and it keeps serving
            assert c.generate_result("y", {"max_tokens": 2}).final.usage.completion_tokens == 2


# ---- info, reflection, metrics ------------------------------------------------------------------
def test_model_info_and_status(client: KimiClient, offline: LLM) -> None:
    info = client.model_info()
    assert info.max_context_length == MAX_MODEL_LEN
    assert info.vocab_size == offline.tokenizer.vocab_size
    assert set(info.eos_token_ids) == set(offline.engine.eos_token_ids)
    assert info.quantization.startswith("int4")
    assert {d.mode: round(d.temperature, 2) for d in info.mode_defaults} == {
        pb.MODE_INSTANT: 0.6,
        pb.MODE_THINKING: 1.0,
        pb.MODE_AGENT: 1.0,
    }
    status = client.server_status()
    assert status.kv_pages_total > 0 and status.page_size == 64 and status.uptime_seconds > 0


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"kimi.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(server: ServerProcess, client: KimiClient) -> None:
    client.generate_result("metrics please", {"max_tokens": 3})
    line = server.wait_for("metrics on port")
    port = int(line.rsplit(" ", 1)[1])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "kimi_time_to_first_token_seconds_count",
        "kimi_inter_token_latency_seconds_count",
        "kimi_e2e_request_latency_seconds_count",
        "kimi_queue_time_seconds_count",
        "kimi_requests_running",
        "kimi_kv_usage_ratio",
        "kimi_prefix_cache_hit_ratio",
        "kimi_prompt_tokens_total",
        "kimi_generation_tokens_total",
        'kimi_requests_finished_total{reason="length",rpc="Generate"}',
        "kimi_guided_requests_total",
        "kimi_guided_lenient_fallbacks_total",
        "kimi_guided_rejected_tokens_total",
        "kimi_guided_masks_total",
        "kimi_guided_mask_seconds_total",
    ):
        assert name in body, name
