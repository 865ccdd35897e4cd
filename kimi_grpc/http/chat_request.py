"""``POST /v1/chat/completions`` body → ``AgentStepRequest``.

The HTTP API is a translation: a chat completion *is* one AgentStep (the same rendering, guided
decoding, parsing and phases), so its output equals the gRPC AgentStep's for the same input.
Field rules follow what real clients send (docs/HTTP_API.md; openai, LangChain, the Agents SDK,
kimi-cli, the K2 Vendor Verifier):

- roles ``developer`` → system; content as a string, ``null``, ``[]`` or text parts (joined);
- user messages may hold ``image_url`` / ``video_url`` parts (``{"url": ...}`` or the URL string
  itself; ``detail`` is ignored) as base64 ``data:`` URLs only — the server fetches nothing from
  URLs. Such a message becomes ``ChatMessage.parts``: every part in order, text parts as text,
  media as the decoded bytes with the URL's mime type; the checks of the bytes (format, limits,
  a model without vision) are AgentStep's;
- assistant history may carry ``reasoning_content`` or ``reasoning`` (null = absent) and
  ``tool_calls`` whose ``arguments`` is a JSON string (an object is accepted and serialised);
- thinking: ``thinking: {"type": "enabled"|"disabled", "keep": "all", "budget_tokens": N}``
  (Moonshot), ``chat_template_kwargs: {"thinking": bool}`` (vLLM/SGLang) and
  ``reasoning_effort: "none"`` (vLLM) all switch it; thinking is the default, and
  ``reasoning_effort`` counts only when neither of the others is given;
- ``prompt_cache_key`` is the session (prefix-cache affinity); ``user``, ``metadata``, ``store``
  and other account-level fields are accepted and ignored.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from kimi_grpc.http.fields import Fields, model_name, sampling
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server.errors import invalid

ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
TOOL_CHOICE_MODES = {
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
RESPONSE_FORMATS = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}  # part type -> ContentPart field
REFUSED_PARTS = ("input_audio", "audio_url", "file")
_BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")
DATA_URL_EXAMPLES = {"image": "data:image/png;base64,...", "video": "data:video/mp4;base64,..."}
TEXT_PARTS = ("text", "refusal")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
MAX_TOP_LOGPROBS = 20


@dataclass
class ChatCompletionCall:
    """A validated chat completion: the AgentStep to run and how to answer."""

    step: pb.AgentStepRequest
    model: str  # echoed in every response
    stream: bool
    include_usage: bool  # stream only: a final usage chunk
    logprobs: bool
    top_logprobs: int
    named_tool: bool  # tool_choice named a function: finish_reason stays "stop" (OpenAI's rule)


def chat_completion_call(data: object, served: str, aliases: tuple[str, ...]) -> ChatCompletionCall:
    body = Fields(data)
    model = model_name(body, served, aliases)
    for legacy in ("functions", "function_call"):
        body.refuse(legacy, "the legacy function-calling API is not supported; use tools")
    body.refuse("audio", "audio output is not supported")
    modalities = body.array("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("modalities", 'only ["text"] is supported')

    step = pb.AgentStepRequest()
    step.messages.extend(_message(m, i) for i, m in enumerate(_required_list(body, "messages")))
    step.tools.extend(_tool(t, i) for i, t in enumerate(body.array("tools") or []))
    named_tool = _tool_choice(body, step)
    if (parallel := body.boolean("parallel_tool_calls")) is not None:
        step.parallel_tool_calls = parallel
    response_format(body, step.response_format)
    _thinking(body, step)

    step.sampling.CopyFrom(
        sampling(body, max_tokens_fields=("max_completion_tokens", "max_tokens"))
    )
    if (n := body.integer("n", 1)) is not None and n != 1:
        raise invalid("n", "only n = 1 is supported (a chat completion is one assistant turn)")
    logprobs = bool(body.boolean("logprobs"))
    top_logprobs = body.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    if logprobs:
        step.sampling.logprobs = top_logprobs or 0
    if (key := body.string("prompt_cache_key")) is not None:
        step.session_id = key
    if (priority := body.integer("priority", -(2**31), 2**31 - 1)) is not None:
        step.priority = priority

    stream = bool(body.boolean("stream"))
    options = body.object("stream_options")
    include_usage = False
    if options is not None and stream:  # ignored when not streaming (some clients always send it)
        include_usage = bool(options.boolean("include_usage"))
    return ChatCompletionCall(
        step=step,
        model=model,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        named_tool=named_tool,
    )


def _required_list(body: Fields, key: str) -> list:
    value = body.array(key, required=True)
    if not value:
        raise invalid(key, "must hold at least one message")
    return value


def _message(data: object, i: int) -> pb.ChatMessage:
    msg = Fields(data, f"messages[{i}]")
    role_name = msg.string("role", required=True)
    if role_name == "function":
        raise invalid(msg.where("role"), "the legacy 'function' role is not supported; use 'tool'")
    if role_name not in ROLES:
        raise invalid(msg.where("role"), f"must be one of {', '.join(ROLES)}; got {role_name!r}")
    out = pb.ChatMessage(role=ROLES[role_name])
    content = _content(msg, role_name)
    if isinstance(content, str):
        out.content = content
    elif content is not None:
        out.parts.extend(content)
    if (name := msg.string("name")) is not None:
        out.name = name
    if role_name == "assistant":
        # reasoning_content (Moonshot, SGLang) or reasoning (vLLM >= 0.17); null means absent.
        reasoning = msg.string("reasoning_content")
        if reasoning is None:
            reasoning = msg.string("reasoning")
        if reasoning is not None:
            out.reasoning_content = reasoning
        out.tool_calls.extend(_history_call(c, f"{msg.where('tool_calls')}[{j}]") for j, c in
                              enumerate(msg.array("tool_calls") or []))  # fmt: skip
    elif role_name == "tool":
        out.tool_call_id = msg.string("tool_call_id") or ""
    return out


def _content(msg: Fields, role: str) -> str | list[pb.ContentPart] | None:
    """String content as is; null or [] → unset; a list of parts → its text parts joined, or every
    part in order when it holds images or videos."""
    content = msg.any("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(msg.where("content"), "must be a string, null or an array of content parts")
    if not content:
        return None
    where = msg.where("content")
    parts = [_part(Fields(part, f"{where}[{j}]"), role) for j, part in enumerate(content)]
    if all(part.WhichOneof("part") == "text" for part in parts):
        return "".join(part.text for part in parts)
    return parts


def _part(part: Fields, role: str) -> pb.ContentPart:
    kind = part.string("type", required=True)
    if kind in TEXT_PARTS:
        return pb.ContentPart(text=part.string(kind, required=True))
    if kind in REFUSED_PARTS:
        raise invalid(
            part.where("type"),
            f"{kind} parts are not supported: this server takes text, images and video",
        )
    if kind not in MEDIA_PARTS:
        raise invalid(part.where("type"), f"unknown content part type {kind!r}")
    if role != "user":
        raise invalid(part.where("type"), f"{kind} parts are only allowed in user messages")
    media = MEDIA_PARTS[kind]
    source = part.any(kind)
    if isinstance(source, str):  # the URL itself, as some clients send it
        url, where = source, part.where(kind)
    elif isinstance(source, dict):
        fields = Fields(source, part.where(kind))  # "detail" is accepted and ignored
        url, where = fields.string("url", required=True), fields.where("url")
    else:
        raise invalid(part.where(kind), 'must be an object {"url": ...} or a URL string')
    mime_type, data = _data_url(url, where, media)
    return pb.ContentPart(**{media: pb.MediaData(data=data, mime_type=mime_type)})


def _data_url(url: str, where: str, media: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 ``data:`` URL (RFC 2397); the mime type may be empty."""
    example = DATA_URL_EXAMPLES[media]
    head, comma, payload = url.partition(",")  # the payload copied once (it may be megabytes)
    scheme, colon, header = head.partition(":")
    if not colon or scheme.lower() != "data":
        raise invalid(
            where,
            f"the server fetches nothing from URLs; send the {media} inline as a base64 data: "
            f"URL ({example})",
        )
    mime_type, *params = header.split(";")
    if not comma or not params or params[-1].strip().lower() != "base64":
        raise invalid(where, f"must be a base64 data: URL ({example})")
    mime_type = mime_type.strip().lower()
    if mime_type and not mime_type.startswith(f"{media}/"):
        raise invalid(where, f"the mime type must be {media}/..., got {mime_type!r}")
    try:  # strict base64, but line breaks and spaces (wrapped encoders) are skipped
        data = base64.b64decode(payload.translate(_BASE64_WHITESPACE), validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise invalid(where, f"the data is not valid base64 ({exc})") from None
    if not data:
        raise invalid(where, f"the data: URL holds no {media} bytes")
    return mime_type, data


def _history_call(data: object, where: str) -> pb.ToolCall:
    call = Fields(data, where)
    kind = call.string("type")
    if kind not in (None, "function"):
        raise invalid(call.where("type"), f"only function tool calls are supported; got {kind!r}")
    function = call.object("function")
    if function is None:
        raise invalid(call.where("function"), "is required")
    arguments = function.any("arguments")
    if isinstance(arguments, dict):  # some clients send the object itself
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif arguments is not None and not isinstance(arguments, str):
        raise invalid(function.where("arguments"), "must be a JSON string")
    return pb.ToolCall(
        id=call.string("id") or "",
        name=function.string("name", required=True),
        arguments=arguments or "{}",
    )


def _tool(data: object, i: int) -> pb.Tool:
    tool = Fields(data, f"tools[{i}]")
    kind = tool.string("type", required=True)
    if kind != "function":
        raise invalid(tool.where("type"), f"only function tools are supported; got {kind!r}")
    function = tool.object("function")
    if function is None:
        raise invalid(tool.where("function"), "is required")
    out = pb.Tool(name=function.string("name", required=True))
    if (description := function.string("description")) is not None:
        out.description = description
    if (parameters := function.object("parameters")) is not None:
        out.parameters_json = json.dumps(parameters.data, ensure_ascii=False)
    if (strict := function.boolean("strict")) is not None:
        out.strict = strict
    return out


def _tool_choice(body: Fields, step: pb.AgentStepRequest) -> bool:
    """Sets step.tool_choice; True when it names a function."""
    choice = body.any("tool_choice")
    if choice is None:
        return False
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise invalid(
                "tool_choice", f"must be none, auto, required or a function; got {choice!r}"
            )
        step.tool_choice.mode = TOOL_CHOICE_MODES[choice]
        return False
    named = Fields(choice, "tool_choice")
    if named.string("type") != "function":
        raise invalid("tool_choice.type", 'only {"type": "function", ...} is supported')
    function = named.object("function")
    if function is None:
        raise invalid("tool_choice.function", "is required")
    step.tool_choice.function_name = function.string("name", required=True)
    return True


def response_format(body: Fields, out: pb.ResponseFormat) -> None:
    """OpenAI's ``response_format`` (text / json_object / json_schema) into ``out``."""
    fmt = body.object("response_format")
    if fmt is None:
        return
    kind = fmt.choice("type", tuple(RESPONSE_FORMATS))
    if kind is None:
        raise invalid("response_format.type", "is required")
    out.type = RESPONSE_FORMATS[kind]
    if kind != "json_schema":
        return
    spec = fmt.object("json_schema")
    if spec is None:
        raise invalid("response_format.json_schema", "is required with type json_schema")
    if (name := spec.string("name")) is not None:
        out.name = name
    schema = spec.object("schema")
    # No schema: any JSON object (OpenAI's json_object).
    out.json_schema = json.dumps(
        schema.data if schema is not None else {"type": "object"}, ensure_ascii=False
    )


def _thinking(body: Fields, step: pb.AgentStepRequest) -> None:
    """Kimi's three thinking switches → mode, preserve_thinking, thinking_budget, template
    kwargs (the contradiction check between ``thinking`` and ``chat_template_kwargs`` is
    AgentStep's)."""
    kwargs = body.object("chat_template_kwargs")
    if kwargs is not None:
        step.chat_template_kwargs_json = json.dumps(kwargs.data, ensure_ascii=False)
    thinking = body.object("thinking")
    if thinking is not None:
        kind = thinking.choice("type", ("enabled", "disabled"))
        if kind is not None:
            step.mode = pb.MODE_THINKING if kind == "enabled" else pb.MODE_INSTANT
        if thinking.string("keep") == "all":  # other values (kimi-cli passes its env through): off
            step.preserve_thinking = True
        if (budget := thinking.integer("budget_tokens", 0, 2**31 - 1)) is not None:
            step.thinking_budget = budget
    kwargs_switch = kwargs is not None and any(
        kwargs.has(key) for key in ("thinking", "enable_thinking")
    )
    effort = body.choice("reasoning_effort", REASONING_EFFORTS)
    if effort is not None and step.mode == pb.MODE_UNSPECIFIED and not kwargs_switch:
        step.mode = pb.MODE_INSTANT if effort == "none" else pb.MODE_THINKING
