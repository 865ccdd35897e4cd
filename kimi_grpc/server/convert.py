"""Proto messages ⇄ the engine's Python types. Every check here names the request field.

proto3 cannot tell "unset" from zero for plain scalars, which is why the numeric sampling fields
are ``optional``: an unset field takes the default given by the caller (Generate's or the
AgentStep mode's), never zero.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kimi_grpc.engine.llm_engine import SequenceDelta
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.sampling_params import SamplingParams, SamplingParamsError
from kimi_grpc.server.errors import invalid

MAX_MESSAGES = 4096
MAX_TOOLS = 512
MAX_PARTS = 4096  # content parts in all messages of a request (media items have their own limit)

# proto field -> SamplingParams argument, for the optional scalars copied when set.
_OPTIONAL_SAMPLING = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "logprobs",
    "skip_special_tokens",
)

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}

ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}


def sampling_params(
    msg: pb.SamplingParams, defaults: dict[str, Any] | None = None, **overrides: Any
) -> SamplingParams:
    """SamplingParams from the proto: set fields win, then ``defaults``; ``overrides`` are the
    server's own settings (not user-visible fields)."""
    kwargs: dict[str, Any] = {"max_tokens": None, **(defaults or {})}  # None: up to the context
    for name in _OPTIONAL_SAMPLING:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    kwargs["stop"] = list(msg.stop) or None
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["include_stop_str_in_output"] = msg.include_stop_str_in_output
    kwargs["ignore_eos"] = msg.ignore_eos
    kwargs["min_tokens"] = msg.min_tokens
    kwargs["logit_bias"] = dict(msg.logit_bias) or None
    kwargs.update(overrides)
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as exc:
        raise invalid(f"sampling.{exc.field}", str(exc)) from None


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        skip_special_tokens=params.skip_special_tokens,
    )


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise invalid(field, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise invalid(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def template_kwargs(text: str, field: str) -> dict[str, Any]:
    return _json_object(text, field) if text else {}


def messages(msgs: Any, field: str = "messages") -> list[dict[str, Any]]:
    """Chat messages as OpenAI-style dicts (what the chat template reads); ``parts`` become a
    content list whose media parts carry their bytes (``kimi_grpc.media.request``)."""
    if not msgs:
        raise invalid(field, "must hold at least one message")
    if len(msgs) > MAX_MESSAGES:
        raise invalid(field, f"holds {len(msgs)} messages; the limit is {MAX_MESSAGES}")
    total_parts = sum(len(msg.parts) for msg in msgs)
    if total_parts > MAX_PARTS:
        raise invalid(field, f"hold {total_parts} content parts; the limit is {MAX_PARTS}")
    out = []
    for i, msg in enumerate(msgs):
        where = f"{field}[{i}]"
        role = ROLES.get(msg.role)
        if role is None:
            raise invalid(f"{where}.role", "must be SYSTEM, USER, ASSISTANT or TOOL")
        item: dict[str, Any] = {"role": role}
        item["content"] = msg.content if msg.HasField("content") else None
        if msg.parts:
            if role != "user":
                raise invalid(f"{where}.parts", "are only allowed on user turns")
            if msg.HasField("content"):
                raise invalid(f"{where}.parts", "set content or parts, not both")
            item["content"] = [
                _part(part, f"{where}.parts[{j}]") for j, part in enumerate(msg.parts)
            ]
        if msg.HasField("reasoning_content"):
            if role != "assistant":
                raise invalid(f"{where}.reasoning_content", "is only allowed on assistant turns")
            item["reasoning_content"] = msg.reasoning_content
        if msg.tool_calls:
            if role != "assistant":
                raise invalid(f"{where}.tool_calls", "are only allowed on assistant turns")
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in msg.tool_calls
            ]
        if msg.tool_call_id:
            if role != "tool":
                raise invalid(f"{where}.tool_call_id", "is only allowed on tool turns")
            item["tool_call_id"] = msg.tool_call_id
        if msg.name:
            item["name"] = msg.name
        out.append(item)
    return out


def _part(part: pb.ContentPart, field: str) -> dict[str, Any]:
    which = part.WhichOneof("part")
    if which == "text":
        return {"type": "text", "text": part.text}
    if which in ("image", "video"):
        media = getattr(part, which)
        return {"type": which, "data": media.data, "mime_type": media.mime_type}
    raise invalid(field, "set text, image or video")


def parts_field(field: str) -> str:
    """A chat-layer path (``messages[0].content[1]``) in proto names (``messages[0].parts[1]``):
    a list content comes from ``ChatMessage.parts``."""
    return re.sub(r"(messages\[\d+\])\.content\[", r"\1.parts[", field)


def tools(decls: Any, field: str = "tools") -> list[dict[str, Any]]:
    """Tool declarations as OpenAI-style ``{"type": "function", "function": {...}}`` dicts."""
    if len(decls) > MAX_TOOLS:
        raise invalid(field, f"holds {len(decls)} tools; the limit is {MAX_TOOLS}")
    out = []
    for i, tool in enumerate(decls):
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json:
            function["parameters"] = _json_object(
                tool.parameters_json, f"{field}[{i}].parameters_json"
            )
        if tool.HasField("strict"):
            function["strict"] = tool.strict
        out.append({"type": "function", "function": function})
    return out


def response_schema(fmt: pb.ResponseFormat, field: str = "response_format") -> dict | None:
    """The JSON schema a response format asks for; None for plain text."""
    if fmt.type in (pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED, pb.RESPONSE_FORMAT_TYPE_TEXT):
        if fmt.json_schema:
            raise invalid(f"{field}.json_schema", "is only used with type JSON_SCHEMA")
        return None
    if fmt.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        if fmt.json_schema:
            raise invalid(f"{field}.json_schema", "is only used with type JSON_SCHEMA")
        return {"type": "object"}
    if fmt.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        if not fmt.json_schema:
            raise invalid(f"{field}.json_schema", "is required with type JSON_SCHEMA")
        return _json_object(fmt.json_schema, f"{field}.json_schema")
    raise invalid(f"{field}.type", f"unknown value {fmt.type}")


def usage(
    prompt: int, completion: int, cached: int, reasoning: int = 0, media: int = 0
) -> pb.Usage:  # counts in tokens
    return pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        media_tokens=media,
    )


def logprobs(delta: SequenceDelta) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=token,
            logprob=logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
        )
        for token, (logprob, top) in zip(delta.token_ids, delta.logprobs, strict=False)
    ]
