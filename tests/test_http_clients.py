"""The client libraries agent builders use, against a real ``kimi-grpc serve --http-port``:
langchain-openai's ``ChatOpenAI`` (invoke, stream, a forced tool, structured output) and the
OpenAI Agents SDK (a function-tool round trip, a typed ``output_type``, a streamed run).

The demo checkpoint has random weights: its text is gibberish, but greedy decoding is
deterministic and guided decoding makes tool arguments and ``response_format`` JSON valid for
their schemas, which is what is checked here. The requests switch thinking off (Moonshot's
``thinking: {"type": "disabled"}``; one test shows the default): a random model rarely closes its
reasoning, so with thinking on, the few tokens allowed here would all be reasoning.
No test touches the network: Agents SDK tracing is off, and nothing counts tokens with tiktoken.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from agents import (
    Agent,
    ModelResponse,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.server_harness import ServerProcess, running_server

MODEL = "kimi-grpc-demo"
NO_THINKING = {"thinking": {"type": "disabled"}}


class Weather(BaseModel):
    """Get the weather forecast for a city."""

    city: Literal["Paris", "Tokyo"]
    days: int = Field(ge=1, le=7)


class Verdict(BaseModel):
    """Bounded fields, so the JSON ends well within max_tokens."""

    ok: bool
    score: int = Field(ge=0, le=9)
    mood: Literal["happy", "sad"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as mp:
        # The Agents SDK exports traces to OpenAI unless told not to. The env var covers a
        # provider that reads it first; set_tracing_disabled overrides it for the process.
        mp.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
        set_tracing_disabled(True)
        with running_server("--http-port", "0") as srv:
            yield srv


@pytest.fixture(scope="module")
def base_url(server: ServerProcess) -> str:
    return server.http_base


# ---- langchain-openai ---------------------------------------------------------------------------


def chat_model(base_url: str, bodies: list[dict], **kwargs: Any) -> ChatOpenAI:
    """ChatOpenAI as the issue writes it; ``bodies`` collects the JSON of each request sent."""
    client = openai.DefaultHttpxClient(
        event_hooks={"request": [lambda request: bodies.append(json.loads(request.content))]}
    )
    settings: dict[str, Any] = {"max_tokens": 16, "extra_body": NO_THINKING, **kwargs}
    return ChatOpenAI(
        base_url=base_url, api_key="x", model=MODEL, temperature=0, max_retries=0,
        http_client=client, **settings,
    )  # fmt: skip


def test_langchain_invoke_and_stream_agree(base_url: str) -> None:
    bodies: list[dict] = []
    llm = chat_model(base_url, bodies, stream_usage=True)
    message = llm.invoke("Say hello.")
    assert isinstance(message, AIMessage)
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 16
    assert message.usage_metadata["output_token_details"]["reasoning"] == 0

    chunks = list(llm.stream("Say hello."))
    assert len(chunks) > 2  # really streamed, not one blob
    assert "".join(chunk.content for chunk in chunks) == message.content
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.content == message.content
    assert total.response_metadata["finish_reason"] == "length"
    # From the include_usage chunk: the same usage, except that the repeated prompt is now
    # served from the prefix cache (all but its last token).
    streamed, invoked = dict(total.usage_metadata), dict(message.usage_metadata)
    assert streamed.pop("input_token_details") == {"cache_read": streamed["input_tokens"] - 1}
    invoked.pop("input_token_details")
    assert streamed == invoked

    assert [b.get("stream") for b in bodies] == [False, True]
    assert bodies[1]["stream_options"] == {"include_usage": True}
    assert all(b["thinking"] == {"type": "disabled"} for b in bodies)


def test_langchain_thinking_is_the_default(base_url: str) -> None:
    """Without the switch the same request spends its tokens on reasoning (which is what makes
    ``extra_body`` thinking-off necessary in the other tests)."""
    message = chat_model(base_url, [], extra_body=None).invoke("Say hello.")
    assert message.usage_metadata["output_token_details"]["reasoning"] > 0


def test_langchain_forced_tool_call_has_valid_arguments(base_url: str) -> None:
    bodies: list[dict] = []
    # strict=True: the schema gets additionalProperties false (OpenAI's strict mode); without it
    # extra keys are allowed and a random model happily invents long ones.
    llm = chat_model(base_url, bodies, max_tokens=128).bind_tools(
        [Weather], tool_choice="Weather", strict=True
    )
    message = llm.invoke("What's the weather in Tokyo for the next 3 days?")
    assert message.invalid_tool_calls == []
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "Weather"
    assert call["id"]
    jsonschema.validate(call["args"], Weather.model_json_schema())
    Weather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "stop"  # OpenAI's rule for a named tool
    assert bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}

    chunks = list(llm.stream("What's the weather in Tokyo for the next 3 days?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.invalid_tool_calls == []
    assert total.tool_calls == message.tool_calls


def test_langchain_structured_output(base_url: str) -> None:
    bodies: list[dict] = []
    llm = chat_model(base_url, bodies, max_tokens=128)
    out = llm.with_structured_output(Verdict, include_raw=True).invoke("Is this test good?")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Verdict)
    fmt = bodies[0]["response_format"]  # the default method: json_schema, guided by the server
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Verdict"
    # The text as the server sent it (not only LangChain's parse of it) fits the schema.
    assert out["raw"].response_metadata["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["raw"].content), fmt["json_schema"]["schema"])


# ---- OpenAI Agents SDK --------------------------------------------------------------------------

calls: list[tuple[str, dict[str, Any]]] = []


@function_tool
def get_weather(city: Literal["Paris", "Tokyo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
    """Weather forecast for a city."""
    calls.append(("get_weather", {"city": city, "days": days}))
    return f"sunny in {city} for {days} days"


@function_tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    calls.append(("add", {"a": a, "b": b}))
    return a + b


TOOLS = {"get_weather": get_weather, "add": add}


def _has_tool_result(items: str | list) -> bool:
    return isinstance(items, list) and any(
        isinstance(item, dict) and item.get("type") == "function_call_output" for item in items
    )


class AnswersAfterToolResults(OpenAIChatCompletionsModel):
    """Random weights cannot decide to stop calling tools: under "auto" (the SDK resets the
    first turn's "required" after a tool call) the next turn may call tools again, and again.
    Once the input holds a tool result, this model asks for tool_choice="none", so the turn after
    the tools answers in text. Everything tested is the SDK's own: the tool runs with the
    model's arguments, its result goes back in the next request, and the run completes."""

    async def get_response(
        self, system_instructions: str | None, input: str | list, model_settings: ModelSettings,
        *args: Any, **kwargs: Any,
    ) -> ModelResponse:  # fmt: skip
        settings = self._settle(input, model_settings)
        return await super().get_response(system_instructions, input, settings, *args, **kwargs)

    def stream_response(
        self, system_instructions: str | None, input: str | list, model_settings: ModelSettings,
        *args: Any, **kwargs: Any,
    ) -> AsyncIterator[Any]:  # fmt: skip
        settings = self._settle(input, model_settings)
        return super().stream_response(system_instructions, input, settings, *args, **kwargs)

    @staticmethod
    def _settle(input: str | list, settings: ModelSettings) -> ModelSettings:
        if _has_tool_result(input):
            return settings.resolve(ModelSettings(tool_choice="none"))
        return settings


def agents_model(base_url: str, bodies: list[dict]) -> AnswersAfterToolResults:
    async def record(request: Any) -> None:
        bodies.append(json.loads(request.content))

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]}),
    )  # fmt: skip
    return AnswersAfterToolResults(model=MODEL, openai_client=client)


def tool_agent(base_url: str, bodies: list[dict]) -> Agent:
    settings = ModelSettings(
        temperature=0, max_tokens=128, tool_choice="required", parallel_tool_calls=False,
        extra_body=NO_THINKING,
    )  # fmt: skip
    return Agent(
        name="forecaster", instructions="Use the tools to answer.",
        model=agents_model(base_url, bodies), tools=[get_weather, add], model_settings=settings,
    )  # fmt: skip


def check_round_trip(bodies: list[dict], new_items: list, final_output: object) -> None:
    """Two requests: the first forced a tool, the second carries the call and its result."""
    assert len(bodies) == 2
    first, second = bodies
    assert first["tool_choice"] == "required"
    assert first["parallel_tool_calls"] is False
    assert {t["function"]["name"] for t in first["tools"]} == set(TOOLS)

    assert len(calls) == 1  # the tool really ran, once
    name, args = calls[0]
    jsonschema.validate(args, TOOLS[name].params_json_schema)
    if name == "get_weather":
        assert args["city"] in ("Paris", "Tokyo") and isinstance(args["days"], int)
        result = f"sunny in {args['city']} for {args['days']} days"
    else:
        assert isinstance(args["a"], int) and isinstance(args["b"], int)
        result = str(args["a"] + args["b"])

    *_, assistant, tool_message = second["messages"]
    [sent_call] = assistant["tool_calls"]
    assert sent_call["function"]["name"] == name
    # The arguments as the server produced them (before the SDK's pydantic coercion) fit the
    # tool's strict schema.
    jsonschema.validate(
        json.loads(sent_call["function"]["arguments"]), TOOLS[name].params_json_schema
    )
    assert tool_message == {"role": "tool", "tool_call_id": sent_call["id"], "content": result}
    assert second["tool_choice"] == "none"

    kinds = [type(item) for item in new_items]
    assert kinds == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    assert isinstance(final_output, str) and final_output


def test_agents_function_tool_round_trip(base_url: str) -> None:
    calls.clear()
    bodies: list[dict] = []
    result = asyncio.run(
        Runner.run(tool_agent(base_url, bodies), "Weather in Paris for 2 days?", max_turns=3)
    )
    check_round_trip(bodies, result.new_items, result.final_output)
    assert len(result.raw_responses) == 2
    assert all(b.get("stream") is None for b in bodies)


def test_agents_streamed_run(base_url: str) -> None:
    calls.clear()
    bodies: list[dict] = []

    async def run() -> tuple[Any, list[str]]:
        streamed = Runner.run_streamed(tool_agent(base_url, bodies), "What is 2 + 3?", max_turns=3)
        events = [
            event.name
            async for event in streamed.stream_events()
            if event.type == "run_item_stream_event"
        ]
        return streamed, events

    streamed, events = asyncio.run(run())
    assert events == ["tool_called", "tool_output", "message_output_created"]
    check_round_trip(bodies, streamed.new_items, streamed.final_output)
    assert all(b["stream"] is True for b in bodies)


def test_agents_typed_output(base_url: str) -> None:
    bodies: list[dict] = []
    agent = Agent(
        name="judge", instructions="Judge the test.", model=agents_model(base_url, bodies),
        output_type=Verdict,
        model_settings=ModelSettings(temperature=0, max_tokens=128, extra_body=NO_THINKING),
    )  # fmt: skip
    result = asyncio.run(Runner.run(agent, "Is this test good?", max_turns=1))
    assert isinstance(result.final_output, Verdict)
    [request] = bodies
    fmt = request["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    # The text the server returned (not only the SDK's parse of it) fits the schema.
    [message] = [i for i in result.new_items if isinstance(i, MessageOutputItem)]
    text = "".join(part.text for part in message.raw_item.content)
    jsonschema.validate(json.loads(text), fmt["json_schema"]["schema"])
    assert Verdict.model_validate_json(text) == result.final_output
