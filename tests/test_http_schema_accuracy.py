"""K2 Vendor Verifier-style schema accuracy through ``/v1/chat/completions`` with the official
``openai`` client: the same 240-case corpus and plan as tests/test_guided_accuracy.py (modes ×
tool_choice × temperature, some with ``parallel_tool_calls=false``, the same logit biases and
seeds; see bench/schema_accuracy.py), sent as OpenAI requests the way K2VV sends them — every
other one streamed with ``stream_options.include_usage`` and folded by tool-call index.

K2VV counts responses whose ``finish_reason`` is ``"tool_calls"``; a named tool_choice finishes
``"stop"`` by OpenAI's rule, so for those the ``"stop"`` responses are counted. All of them
must validate against their tool's schema and obey tool_choice / parallel_tool_calls.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from bench import schema_accuracy as sa
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.server_harness import start_server

CONCURRENCY = 32
MIN_TOOL_CALLS_SHARE = 0.6
FINISHES = {
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
}


def body(spec: sa.Spec, biases: dict[bool, dict[int, float]]) -> dict:
    kwargs: dict = {
        "model": "kimi-grpc-demo",
        "messages": spec.case.messages,
        "tools": spec.tools(),
        "temperature": spec.temperature,
        "max_tokens": sa.MAX_TOKENS,
        "seed": sa.SEED,
        "logit_bias": {str(k): v for k, v in biases[spec.choice == "auto"].items()},
    }
    if spec.choice == "named":
        kwargs["tool_choice"] = {"type": "function", "function": {"name": spec.named}}
    else:
        kwargs["tool_choice"] = spec.choice
    if not spec.parallel:
        kwargs["parallel_tool_calls"] = False
    if spec.mode == "instant":
        kwargs["extra_body"] = {"thinking": {"type": "disabled"}}
    else:  # THINKING and AGENT: thinking on, with the plan's reasoning budget
        kwargs["extra_body"] = {
            "thinking": {"type": "enabled", "budget_tokens": sa.THINKING_BUDGET}
        }
    return kwargs


async def answer(client: openai.AsyncOpenAI, kwargs: dict, stream: bool) -> tuple[str, list]:
    """(finish_reason, [(id, name, arguments)]) from a whole or a streamed response."""
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        calls = r.choices[0].message.tool_calls or []
        return r.choices[0].finish_reason, [
            (c.id, c.function.name, c.function.arguments) for c in calls
        ]
    folded: dict[int, list] = {}
    finish = None
    chunks = await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                entry = folded.setdefault(call.index, [None, None, ""])
                if call.id is not None:
                    entry[0], entry[1] = call.id, call.function.name
                entry[2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return finish, [tuple(folded[i]) for i in sorted(folded)]


async def run(base_url: str, plan: list[sa.Spec]) -> sa.Report:
    biases = sa.all_biases(KimiTokenizer.from_dir(demo_tokenizer_dir()))
    gate = asyncio.Semaphore(CONCURRENCY)
    start = time.monotonic()
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="unused", max_retries=0, timeout=600
    ) as client:

        async def one(index: int, spec: sa.Spec) -> sa.Outcome:
            outcome = sa.Outcome(spec)
            async with gate:
                try:
                    finish, calls = await answer(client, body(spec, biases), stream=index % 2 == 1)
                except openai.APIError as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                    return outcome
            # A named choice's complete turn finishes "stop" (OpenAI's rule); a cut one "length".
            counted = finish == "tool_calls" or (spec.choice == "named" and finish == "stop")
            outcome.final = pb.AgentStepFinal(
                message=pb.ChatMessage(
                    role=pb.ROLE_ASSISTANT,
                    tool_calls=[pb.ToolCall(id=i, name=n, arguments=a) for i, n, a in calls],
                ),
                finish_reason=pb.FINISH_REASON_TOOL_CALLS if counted else FINISHES[finish],
            )
            outcome.score()
            return outcome

        outcomes = await asyncio.gather(*(one(i, s) for i, s in enumerate(plan)))
    return sa.Report(True, list(outcomes), time.monotonic() - start)


@pytest.fixture(scope="module")
def report() -> sa.Report:
    server = start_server("--http-port", "0", "--max-num-seqs", "64")
    try:
        result = asyncio.run(run(server.http_base, sa.specs()))
    finally:
        server.terminate()
    print(f"\nthrough /v1/chat/completions: {result.summary()}")
    return result


def test_http_schema_accuracy_is_100_percent(report: sa.Report, record_property) -> None:
    record_property("http_schema_accuracy", report.accuracy)
    failures = report.failures()  # HTTP errors, invalid calls, tool_choice violations
    assert not failures, f"{len(failures)} failing responses:\n" + "\n".join(failures)
    assert len(report.outcomes) == len(sa.specs())
    assert len(report.counted) >= MIN_TOOL_CALLS_SHARE * len(report.outcomes), report.summary()
    assert report.accuracy == 1.0
    # Both delivery paths were scored (streamed responses fold to valid calls too).
    streamed = [o for i, o in enumerate(report.outcomes) if i % 2 and o.tool_calls]
    assert len(streamed) >= 0.25 * len(report.outcomes)


def test_http_tool_call_ids_are_unique_within_a_turn(report: sa.Report) -> None:
    for outcome in report.counted:
        ids = [c.id for c in outcome.final.message.tool_calls]
        assert len(ids) == len(set(ids)), ids
        for call in outcome.final.message.tool_calls:
            assert call.id.startswith(f"functions.{call.name}:"), call.id
