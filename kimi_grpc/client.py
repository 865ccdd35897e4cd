"""Python clients for ``kimi.v1.InferenceService``: ``KimiClient`` (blocking) and
``AsyncKimiClient`` (asyncio), with the same methods.

Messages and tools may be given as OpenAI-style dicts::

    with KimiClient("localhost:50051") as client:
        for response in client.agent_step(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[{"name": "get_weather", "parameters": {"type": "object"}}],
            mode="agent",
        ):
            ...

Streaming methods yield the raw ``GenerateResponse`` / ``AgentStepResponse`` messages; the
``*_result`` helpers fold a stream into its final message plus the concatenated text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.proto import inference_pb2_grpc as pb_grpc

MODES = {
    "instant": pb.MODE_INSTANT,
    "thinking": pb.MODE_THINKING,
    "agent": pb.MODE_AGENT,
}
ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
ROLES["tool"] = pb.ROLE_TOOL
TOOL_CHOICES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),  # inline videos: the server's limit decides
]

Message = Mapping[str, Any] | pb.ChatMessage
Tool = Mapping[str, Any] | pb.Tool


# ---- request builders ---------------------------------------------------------------------------
def sampling(params: Mapping[str, Any] | pb.SamplingParams | None) -> pb.SamplingParams:
    """``{"temperature": 0.6, "max_tokens": 64, "stop": ["\\n"]}`` -> ``SamplingParams``."""
    if params is None or isinstance(params, pb.SamplingParams):
        return params or pb.SamplingParams()
    params = dict(params)
    bias = params.pop("logit_bias", None) or {}
    msg = pb.SamplingParams(**params)
    for token, value in bias.items():
        msg.logit_bias[int(token)] = value
    return msg


def chat_message(message: Message) -> pb.ChatMessage:
    """A pb.ChatMessage from an OpenAI-style dict. A user ``content`` list becomes ``parts``:
    ``{"type": "text", "text"}``, ``{"type": "image" | "video", "data": bytes, "mime_type"?}``."""
    if isinstance(message, pb.ChatMessage):
        return message
    out = pb.ChatMessage(role=ROLES[message["role"]])
    content = message.get("content")
    if isinstance(content, list | tuple):
        out.parts.extend(content_part(part) for part in content)
    elif content is not None:
        out.content = content
    if message.get("reasoning_content") is not None:
        out.reasoning_content = message["reasoning_content"]
    if message.get("tool_call_id"):
        out.tool_call_id = message["tool_call_id"]
    if message.get("name"):
        out.name = message["name"]
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call)
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.tool_calls.add(id=call.get("id", ""), name=fn["name"], arguments=arguments)
    return out


def content_part(part: Mapping[str, Any]) -> pb.ContentPart:
    if part["type"] == "text":
        return pb.ContentPart(text=part["text"])
    if part["type"] in ("image", "video"):
        media = pb.MediaData(data=part["data"], mime_type=part.get("mime_type") or "")
        return pb.ContentPart(**{part["type"]: media})
    raise ValueError(f"content part type {part['type']!r}: expected text, image or video")


def tool(declaration: Tool) -> pb.Tool:
    """A pb.Tool from ``{"name", "description", "parameters"}`` or the OpenAI
    ``{"type": "function", "function": {...}}`` form."""
    if isinstance(declaration, pb.Tool):
        return declaration
    fn = declaration.get("function", declaration)
    parameters = fn.get("parameters")
    out = pb.Tool(
        name=fn["name"],
        description=fn.get("description", ""),
        parameters_json=json.dumps(parameters, ensure_ascii=False) if parameters else "",
    )
    if fn.get("strict") is not None:
        out.strict = fn["strict"]
    return out


def tool_choice(choice: str | None) -> pb.ToolChoice:
    """ "auto" | "none" | "required" | a tool name."""
    if choice is None:
        return pb.ToolChoice()
    if choice in TOOL_CHOICES:
        return pb.ToolChoice(mode=TOOL_CHOICES[choice])
    return pb.ToolChoice(function_name=choice)


def generate_request(
    prompt: str | Sequence[int],
    params: Mapping[str, Any] | pb.SamplingParams | None = None,
    **fields,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=sampling(params), **fields)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def agent_step_request(
    messages: Sequence[Message],
    *,
    tools: Sequence[Tool] = (),
    tool_choice_: str | None = None,
    mode: str = "thinking",
    thinking_budget: int | None = None,
    params: Mapping[str, Any] | pb.SamplingParams | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    **fields,
) -> pb.AgentStepRequest:
    request = pb.AgentStepRequest(
        messages=[chat_message(m) for m in messages],
        tools=[tool(t) for t in tools],
        tool_choice=tool_choice(tool_choice_),
        mode=MODES[mode],
        sampling=sampling(params),
        chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
        **fields,
    )
    if thinking_budget is not None:
        request.thinking_budget = thinking_budget
    return request


# ---- folded results -----------------------------------------------------------------------------
@dataclass
class GenerateResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    final: pb.GenerateFinal | None = None


@dataclass
class AgentStepResult:
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    tool_arguments: dict[int, str] = field(default_factory=dict)  # streamed, per call index
    final: pb.AgentStepFinal | None = None

    def add(self, response: pb.AgentStepResponse) -> None:
        if response.HasField("final"):
            self.final = response.final
            return
        delta = response.delta
        self.reasoning += delta.reasoning
        self.content += delta.content
        self.token_ids.extend(delta.token_ids)
        for call in delta.tool_calls:
            self.tool_arguments[call.index] = (
                self.tool_arguments.get(call.index, "") + call.arguments
            )


def _fold_generate(result: GenerateResult, response: pb.GenerateResponse) -> None:
    if response.HasField("final"):
        result.final = response.final
    else:
        result.text += response.delta.text
        result.token_ids.extend(response.delta.token_ids)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(tls: bool | str) -> grpc.ChannelCredentials | None:
    if not tls:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    with open(tls, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


# ---- clients ------------------------------------------------------------------------------------
class KimiClient:
    """Blocking client. ``tls``: False, True (system roots) or a CA bundle path."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool | str = False) -> None:
        creds = _credentials(tls)
        self.channel = (
            grpc.secure_channel(target, creds, options=CLIENT_OPTIONS)
            if creds
            else grpc.insecure_channel(target, options=CLIENT_OPTIONS)
        )
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.metadata = _metadata(api_key)

    def __enter__(self) -> KimiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(
        self, prompt: str | Sequence[int], params=None, *, timeout: float | None = None, **fields
    ) -> Iterator[pb.GenerateResponse]:
        request = generate_request(prompt, params, **fields)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def generate_result(self, prompt: str | Sequence[int], params=None, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for response in self.generate(prompt, params, **kwargs):
            _fold_generate(result, response)
        return result

    def agent_step(
        self,
        messages: Sequence[Message],
        *,
        timeout: float | None = None,
        tool_choice: str | None = None,
        **kwargs,
    ) -> Iterator[pb.AgentStepResponse]:
        request = agent_step_request(messages, tool_choice_=tool_choice, **kwargs)
        return self.stub.AgentStep(request, timeout=timeout, metadata=self.metadata)

    def agent_step_result(self, messages: Sequence[Message], **kwargs) -> AgentStepResult:
        result = AgentStepResult()
        for response in self.agent_step(messages, **kwargs):
            result.add(response)
        return result

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return self.stub.Tokenize(request, metadata=self.metadata)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def server_status(self) -> pb.GetServerStatusResponse:
        return self.stub.GetServerStatus(pb.GetServerStatusRequest(), metadata=self.metadata)

    def abort(self, request_ids: Sequence[str]) -> list[str]:
        response = self.stub.Abort(pb.AbortRequest(request_ids=request_ids), metadata=self.metadata)
        return list(response.aborted_request_ids)


class AsyncKimiClient:
    """asyncio client; create it inside the running event loop."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool | str = False) -> None:
        creds = _credentials(tls)
        self.channel = (
            grpc.aio.secure_channel(target, creds, options=CLIENT_OPTIONS)
            if creds
            else grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
        )
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.metadata = _metadata(api_key)

    async def __aenter__(self) -> AsyncKimiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def generate(
        self, prompt: str | Sequence[int], params=None, *, timeout: float | None = None, **fields
    ) -> AsyncIterator[pb.GenerateResponse]:
        request = generate_request(prompt, params, **fields)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def generate_result(
        self, prompt: str | Sequence[int], params=None, **kwargs
    ) -> GenerateResult:
        result = GenerateResult()
        async for response in self.generate(prompt, params, **kwargs):
            _fold_generate(result, response)
        return result

    def agent_step(
        self,
        messages: Sequence[Message],
        *,
        timeout: float | None = None,
        tool_choice: str | None = None,
        **kwargs,
    ) -> AsyncIterator[pb.AgentStepResponse]:
        request = agent_step_request(messages, tool_choice_=tool_choice, **kwargs)
        return self.stub.AgentStep(request, timeout=timeout, metadata=self.metadata)

    async def agent_step_result(self, messages: Sequence[Message], **kwargs) -> AgentStepResult:
        result = AgentStepResult()
        async for response in self.agent_step(messages, **kwargs):
            result.add(response)
        return result

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(request, metadata=self.metadata)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def server_status(self) -> pb.GetServerStatusResponse:
        return await self.stub.GetServerStatus(pb.GetServerStatusRequest(), metadata=self.metadata)

    async def abort(self, request_ids: Sequence[str]) -> list[str]:
        response = await self.stub.Abort(
            pb.AbortRequest(request_ids=request_ids), metadata=self.metadata
        )
        return list(response.aborted_request_ids)
