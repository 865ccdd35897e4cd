"""One AgentStep: render the chat, generate the assistant turn, parse it as it streams.

Modes map onto the K2.6 template's ``thinking`` switch: INSTANT renders ``<think></think>`` (no
reasoning); THINKING and AGENT leave the prompt inside ``<think>``.

Guided decoding (on by default when the server enables it and the request declares tools or a
response format) makes the turn valid by construction: the engine constrains everything after
the reasoning with the Kimi tool-call grammar (``kimi_grpc.guided``): only declared tools, their
arguments valid for their schemas, exactly one call of a named tool, at least one call for
REQUIRED, JSON content for a response format. tool_choice NONE bans the tool markers outright.

What the engine cannot do inside one request is done by *phases*: the step stops the engine
request at a token boundary, appends forced tokens, and continues with a new engine request on
prompt + everything so far (the prefix cache makes the continuation's prefill nearly free):

- thinking budget: after ``thinking_budget`` reasoning tokens without ``</think>``, force it (the
  continuation's grammar starts after it);
- without guided decoding, tool_choice REQUIRED / a named function: when reasoning ends (or at
  once in INSTANT mode), force ``<|tool_calls_section_begin|><|tool_call_begin|>`` (for a named
  function also ``functions.NAME:N<|tool_call_argument_begin|>``).

The parser sees the forced text like any other output, so deltas, the final message and a later
re-render all agree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from kimi_grpc.chat import ChatError
from kimi_grpc.guided import Constraint, GrammarError
from kimi_grpc.guided.constraint import build_constraint
from kimi_grpc.media import MEDIA_PAD_ID, MediaError
from kimi_grpc.media.request import ChatPrompt, chat_prompt
from kimi_grpc.parsers import StreamParser
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server import convert
from kimi_grpc.server.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ServiceError,
    engine_errors,
    invalid,
)
from kimi_grpc.server.metrics import RequestClock, ServerMetrics
from kimi_grpc.server.runtime import Call, LoadedModel
from kimi_grpc.special_text import SpecialTokenText

# Kimi's recommended sampling per mode (kimi-spec.md 6.1).
MODE_DEFAULTS: dict[int, dict[str, float]] = {
    pb.MODE_INSTANT: {"temperature": 0.6, "top_p": 0.95},
    pb.MODE_THINKING: {"temperature": 1.0, "top_p": 0.95},
    pb.MODE_AGENT: {"temperature": 1.0, "top_p": 0.95},
}
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CHOICES = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
    pb.TOOL_CHOICE_MODE_NONE: "none",
}


def _special_ids(model: LoadedModel, *names: str) -> list[int]:
    ids = [model.tokenizer.token_id(name) for name in names]
    missing = [n for n, i in zip(names, ids, strict=True) if i is None]
    if missing:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this model's tokenizer lacks {', '.join(missing)}; AgentStep needs Kimi's tokens",
        )
    return ids  # type: ignore[return-value]


def thinking_switches(
    mode: int, preserve: bool, kwargs_json: str, field: str
) -> tuple[int, bool, dict[str, Any]]:
    """(mode, preserve_thinking, other template kwargs). ``mode`` is the canonical switch; the
    vLLM/SGLang-style ``chat_template_kwargs`` ``{"thinking": bool}`` (or ``enable_thinking``) and
    ``{"preserve_thinking": bool}`` are accepted too, as long as they do not contradict ``mode``."""
    kwargs = convert.template_kwargs(kwargs_json, field)
    for key in ("thinking", "enable_thinking"):
        if key not in kwargs:
            continue
        value = kwargs.pop(key)
        if not isinstance(value, bool):
            raise invalid(f"{field}.{key}", "must be true or false")
        implied = pb.MODE_THINKING if value else pb.MODE_INSTANT
        if mode == pb.MODE_UNSPECIFIED:
            mode = implied
        elif (mode != pb.MODE_INSTANT) != value:
            raise invalid(f"{field}.{key}", f"contradicts mode {pb.Mode.Name(mode)}")
    if "preserve_thinking" in kwargs:
        value = kwargs.pop("preserve_thinking")
        if not isinstance(value, bool):
            raise invalid(f"{field}.preserve_thinking", "must be true or false")
        preserve = preserve or value
    if mode not in MODE_DEFAULTS and mode != pb.MODE_UNSPECIFIED:
        raise invalid("mode", f"unknown mode {mode}")
    return mode or pb.MODE_THINKING, preserve, kwargs


def _render(
    model: LoadedModel, prefix: str, messages: list, tools: list, **kwargs: Any
) -> ChatPrompt:
    """The chat's prompt (media decoded, rendered, pads expanded), its errors named as request
    fields. Blocking: run it off the event loop."""
    vision = model.engine.model.config.vision_config
    try:
        return chat_prompt(
            model.chat,
            messages,
            model.media_config,
            model.media_limits,
            pad_id=vision.media_placeholder_token_id if vision else MEDIA_PAD_ID,
            tools=tools or None,
            **kwargs,
        )
    except ChatError as exc:
        field = exc.field.replace("chat_template_kwargs", "chat_template_kwargs_json")
        raise invalid(prefix + convert.parts_field(field), exc.message) from None
    except MediaError as exc:
        message = exc.message.removeprefix(f"{exc.field}: ")
        raise invalid(prefix + convert.parts_field(exc.field or "messages"), message) from None


class AgentStep:
    """Validated request state for one step; ``render`` then ``run``."""

    def __init__(
        self,
        model: LoadedModel,
        request: pb.AgentStepRequest,
        metrics: ServerMetrics | None,
        stream_interval: int = 1,
    ) -> None:
        self.model, self.request, self.metrics = model, request, metrics
        self.stream_interval = stream_interval  # tokens per engine delta (the server's setting)
        mode, self.preserve_thinking, self.template_kwargs = thinking_switches(
            request.mode,
            request.preserve_thinking,
            request.chat_template_kwargs_json,
            "chat_template_kwargs_json",
        )
        self.mode = mode
        self.thinking = mode != pb.MODE_INSTANT
        self.tools = convert.tools(request.tools)
        if mode == pb.MODE_AGENT and not self.tools:
            raise invalid("tools", "AGENT mode needs at least one declared tool")
        self.messages = convert.messages(request.messages)
        self.has_media = any(m.parts for m in request.messages)
        self.forced_name = self._tool_choice()
        budget = request.thinking_budget if request.HasField("thinking_budget") else None
        if budget is not None and budget < 0:
            raise invalid("thinking_budget", f"must be >= 0, got {budget}")
        self.budget = budget if self.thinking else None
        self.response_schema = convert.response_schema(request.response_format)
        self.parallel_tool_calls = True
        if request.HasField("parallel_tool_calls"):
            self.parallel_tool_calls = request.parallel_tool_calls
        self.guided = self._guided(model)

        think_end, section, call, argument = _special_ids(
            model, THINK_END, SECTION_BEGIN, CALL_BEGIN, ARGUMENT_BEGIN
        )
        self.think_end_id, self.section_id, self.call_id = think_end, section, call
        self.argument_id = argument
        self.reasoning_end_ids = frozenset((think_end, section, call))
        if request.sampling.HasField("n") and request.sampling.n != 1:
            raise invalid("sampling.n", "AgentStep produces one assistant turn; n must be 1")
        # Skipping special tokens drops control tokens (<|im_end|>, reserved slots) but keeps the
        # tool markers and think tags (Kimi flags them "special": false), which the parser reads.
        self.params = convert.sampling_params(
            request.sampling, MODE_DEFAULTS[mode], skip_special_tokens=True
        )

    def _guided(self, model: LoadedModel) -> bool:
        """Whether this step runs with a grammar (validates the switch and response_format)."""
        enabled = model.engine.grammar_backend is not None
        asked = self.request.guided_decoding if self.request.HasField("guided_decoding") else None
        if asked and not enabled:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "guided_decoding: the server runs with --guided-decoding off",
                field="guided_decoding",
            )
        guided = enabled and asked is not False
        if self.response_schema is not None and not guided:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "response_format: needs guided decoding, which is off for this "
                + ("request" if enabled else "server (--guided-decoding off)"),
                field="response_format",
            )
        return guided and (bool(self.tools) or self.response_schema is not None)

    def constraint(self, chat: ChatPrompt) -> Constraint | None:
        """The engine constraint for this step (blocking: compiles the grammar)."""
        try:
            return build_constraint(
                self.model.engine.grammar_backend,
                self.model.tokenizer,
                self.model.engine.guided_stats,
                tools=self.tools,
                tool_choice=TOOL_CHOICES[self.tool_choice_mode],
                function_name=self.forced_name,
                parallel_tool_calls=self.parallel_tool_calls,
                response_schema=self.response_schema,
                first_call_index=chat.rendered.num_tool_calls,
                thinking=self.thinking,
                guided=self.guided,
                tools_field="tools",
                response_field="response_format.json_schema",
            )
        except GrammarError as exc:
            field = exc.field.replace("].parameters", "].parameters_json")
            raise invalid(field, exc.message) from None

    def _tool_choice(self) -> str | None:
        """Sets ``tool_choice_mode``; returns the forced function name, if any."""
        choice = self.request.tool_choice
        names = [t["function"]["name"] for t in self.tools]
        which = choice.WhichOneof("choice")
        self.tool_choice_mode = pb.TOOL_CHOICE_MODE_AUTO
        if which == "function_name":
            if choice.function_name not in names:
                raise invalid(
                    "tool_choice.function_name",
                    f"{choice.function_name!r} is not a declared tool (declared: {names})",
                )
            self.tool_choice_mode = pb.TOOL_CHOICE_MODE_REQUIRED
            return choice.function_name
        if which == "mode" and choice.mode != pb.TOOL_CHOICE_MODE_UNSPECIFIED:
            if choice.mode not in pb.ToolChoiceMode.values():
                raise invalid("tool_choice.mode", f"unknown value {choice.mode}")
            self.tool_choice_mode = choice.mode
        if self.tool_choice_mode == pb.TOOL_CHOICE_MODE_REQUIRED and not names:
            raise invalid("tool_choice", "REQUIRED needs at least one declared tool")
        return None

    @staticmethod
    def render_chat(model: LoadedModel, chat: pb.ChatInput, field: str) -> ChatPrompt:
        """Renders a ``ChatInput`` (Tokenize) with the same rules as AgentStep."""
        mode, preserve, kwargs = thinking_switches(
            chat.mode,
            chat.preserve_thinking,
            chat.chat_template_kwargs_json,
            f"{field}.chat_template_kwargs_json",
        )
        add_generation_prompt = True
        if chat.HasField("add_generation_prompt"):
            add_generation_prompt = chat.add_generation_prompt
        return _render(
            model,
            f"{field}.",
            convert.messages(chat.messages, f"{field}.messages"),
            convert.tools(chat.tools, f"{field}.tools"),
            add_generation_prompt=add_generation_prompt,
            thinking=mode != pb.MODE_INSTANT,
            preserve_thinking=preserve,
            template_kwargs=kwargs,
        )

    def render(self) -> ChatPrompt:
        """The step's prompt (blocking: media are decoded here). Called once: the messages
        (with any media bytes) are let go afterwards."""
        messages, self.messages = self.messages, []
        return _render(
            self.model,
            "",
            messages,
            self.tools,
            thinking=self.thinking,
            preserve_thinking=self.preserve_thinking,
            template_kwargs=self.template_kwargs,
        )

    def fit_context(self, prompt_tokens: int) -> None:
        """OpenAI semantics (the HTTP API): ``max_tokens`` is a ceiling clamped to the room the
        context and the KV cache leave after the prompt (clients such as kimi-cli ask for about
        the whole window); only a prompt that leaves no room at all is refused."""
        engine = self.model.engine
        limit = min(engine.max_model_len, engine.blocks.num_pages * engine.blocks.page_size)
        room = limit - prompt_tokens
        if room < 1:
            error = invalid(
                "messages",
                f"the prompt has {prompt_tokens} tokens; this model's maximum context length is "
                f"{limit} tokens",
            )
            error.reason = CONTEXT_LENGTH_EXCEEDED
            raise error
        if self.params.max_tokens is not None and self.params.max_tokens > room:
            min_tokens = min(self.params.min_tokens, room)
            self.params = replace(self.params, max_tokens=room, min_tokens=min_tokens)

    def _forced_tool_ids(self, first_call_index: int) -> list[int]:
        ids = [self.section_id, self.call_id]
        if self.forced_name is not None:
            call_id = f"functions.{self.forced_name}:{first_call_index}"
            ids += [*self.model.tokenizer.encode(call_id), self.argument_id]
        return ids

    def _pieces(self) -> SpecialTokenText:
        """The text splitter of one engine request (markers count only as special-token ids)."""
        return SpecialTokenText(self.model.tokenizer, skip_special_tokens=True)

    async def run(
        self,
        request_id: str,
        chat: ChatPrompt,
        call: Call,
        clock: RequestClock,
        constraint: Constraint | None = None,
    ) -> AsyncIterator[pb.AgentStepResponse]:
        llm = self.model.llm
        first_call_index = chat.rendered.num_tool_calls  # ids continue the conversation's count
        # Token mode: a marker is structure only when it arrives as its special-token id, so a
        # tool argument quoting "<|tool_call_end|>" as text stays inside its call.
        parser = StreamParser(
            thinking=self.thinking,
            tools=self.tools,
            first_call_index=first_call_index,
            markers_as_tokens=True,
        )
        prompt = chat.token_ids
        generated: list[int] = []  # every completion token, forced ones included
        pending: list[int] = []  # token ids not yet attached to a sent delta
        with_logprobs = self.params.logprobs is not None
        pending_logprobs: list[pb.TokenLogprob] = []  # parallel to pending (with logprobs)
        reasoning_open, reasoning_tokens = self.thinking, 0
        # Without a grammar, REQUIRED / a named tool is enforced by forcing the call's opening.
        must_call = self.tool_choice_mode == pb.TOOL_CHOICE_MODE_REQUIRED and not self.guided
        cached, admitted = 0, False
        finish_reason: str | None = None
        dropped: list[str] = []  # text of a model marker replaced by the forced call opening

        def respond(pieces: list[tuple[str, bool]]) -> pb.AgentStepResponse | None:
            reasoning, content, calls = [], [], []
            for text, special in pieces:
                if special and dropped and text == dropped[0]:
                    dropped.pop()
                    continue
                out = parser.feed_marker(text) if special else parser.feed_text(text)
                reasoning.append(out.reasoning)
                content.append(out.content)
                calls += out.tool_calls
            return _response("".join(reasoning), "".join(content), calls)

        def _response(reasoning: str, content: str, calls: list) -> pb.AgentStepResponse | None:
            if not (reasoning or content or calls):
                return None
            delta = pb.AgentStepDelta(
                reasoning=reasoning,
                content=content,
                tool_calls=[
                    pb.ToolCallDelta(
                        index=d.index, id=d.id or "", name=d.name or "", arguments=d.arguments
                    )
                    for d in calls
                ],
                token_ids=pending,
                logprobs=pending_logprobs,
            )
            pending.clear()
            pending_logprobs.clear()
            return pb.AgentStepResponse(delta=delta)

        def force(ids: list[int]) -> pb.AgentStepResponse | None:
            generated.extend(ids)
            pending.extend(ids)
            if with_logprobs:  # the server chose these: probability 1
                pending_logprobs.extend(pb.TokenLogprob(token_id=t, logprob=0.0) for t in ids)
            forced = self._pieces()
            forced.push(ids, "")
            return respond(forced.remainder())

        if must_call and not self.thinking:  # INSTANT: the turn opens with the tool call
            if (r := force(self._forced_tool_ids(first_call_index))) is not None:
                yield r
            must_call = False

        while finish_reason is None:
            if call.aborted:
                finish_reason = "abort"
                break
            if reasoning_open and self.budget is not None and reasoning_tokens >= self.budget:
                reasoning_open = False  # budget spent (or 0): close reasoning before generating
                if (r := force([self.think_end_id])) is not None:
                    yield r
                if constraint is not None:  # the grammar starts after the forced </think>
                    constraint = replace(constraint, start_in_reasoning=False)
                if must_call:
                    must_call = False
                    if (r := force(self._forced_tool_ids(first_call_index))) is not None:
                        yield r
            params = self.params
            left = None if params.max_tokens is None else params.max_tokens - len(generated)
            if left is not None and left < 1:
                finish_reason = "length"
                break
            # min_tokens counts the whole turn: what is left of it, within this phase.
            min_tokens = max(params.min_tokens - len(generated), 0)
            if left is not None:
                min_tokens = min(min_tokens, left)
            params = replace(params, max_tokens=left, min_tokens=min_tokens)
            pieces = self._pieces()
            cut: str | None = None
            stream = llm.generate(
                prompt + generated,
                params,
                request_id=request_id,
                priority=self.request.priority,
                session_id=self.request.session_id or None,
                constraint=constraint,
                media=chat.spans,
                stream_interval=self.stream_interval,
            )
            try:
                async for delta in engine_errors(
                    stream, {"prompt": "messages", "media": "messages"}
                ):
                    if not admitted:
                        admitted, cached = True, delta.num_cached_tokens
                        clock.admitted(delta)
                    clock.tokens(len(delta.token_ids))
                    kept = list(delta.token_ids)
                    kept_logprobs = convert.logprobs(delta) if with_logprobs else []
                    for token in delta.token_ids:
                        if reasoning_open and token in self.reasoning_end_ids:
                            reasoning_open = False
                            if constraint is not None:  # the engine's guide left reasoning too
                                constraint = replace(constraint, start_in_reasoning=False)
                            if must_call and (token == self.think_end_id or self.forced_name):
                                cut = "tool"  # reasoning is over: force the call next
                                if token != self.think_end_id:  # drop the model's own opener
                                    if with_logprobs:
                                        del kept_logprobs[kept.index(token)]
                                    kept.remove(token)
                                    dropped.append(self.model.tokenizer.decode([token]))
                        elif reasoning_open:
                            reasoning_tokens += 1
                    generated.extend(kept)
                    pending.extend(kept)
                    pending_logprobs.extend(kept_logprobs)
                    if (r := respond(pieces.push(delta.token_ids, delta.text))) is not None:
                        yield r
                    budget = self.budget
                    if cut is None and reasoning_open and budget is not None:
                        cut = "budget" if reasoning_tokens >= budget else None
                    if delta.finished:  # eos, stop, max_tokens or abort end the turn as they are
                        finish_reason, cut = delta.finish_reason, None
                    if cut is not None:
                        break
            finally:
                await stream.aclose()
            if cut is None:  # the engine finished the turn (a marker cut by a stop is text)
                if (r := respond(pieces.finish())) is not None:
                    yield r
                continue
            # Text the engine held back (a partial character or stop-string prefix) is real
            # output: it goes out before the forced tokens.
            if (r := respond(pieces.remainder())) is not None:
                yield r
            if cut == "tool":  # (a budget cut is handled at the top of the loop)
                must_call = False
                if (r := force(self._forced_tool_ids(first_call_index))) is not None:
                    yield r

        final = parser.finish()
        if (r := _response(final.reasoning, final.content, list(final.tool_calls))) is not None:
            yield r
        result = parser.result
        if finish_reason == "stop" and result.tool_calls:
            finish_reason = "tool_calls"
        if self.request.session_id:  # the host tier keeps a session's pages for its next step
            if finish_reason in ("tool_calls", "length"):  # a tool runs / the turn goes on
                llm.retain_session(self.request.session_id)
            elif finish_reason == "stop":  # the session's answer: nothing left to keep
                llm.release_session(self.request.session_id)
        if self.metrics:
            self.metrics.finished.labels("AgentStep", finish_reason).inc()
        message = pb.ChatMessage(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[
                pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in result.tool_calls
            ],
        )
        if result.content or not result.tool_calls:
            message.content = result.content
        if result.reasoning or self.thinking:
            message.reasoning_content = result.reasoning
        if pending:
            yield pb.AgentStepResponse(
                delta=pb.AgentStepDelta(token_ids=pending, logprobs=pending_logprobs)
            )
        yield pb.AgentStepResponse(
            final=pb.AgentStepFinal(
                request_id=request_id,
                message=message,
                finish_reason=convert.FINISH_REASONS[finish_reason],
                usage=convert.usage(
                    len(prompt), len(generated), cached, reasoning_tokens, chat.num_media_tokens
                ),
                timings=clock.timings(),
                parse_errors=result.errors,
            )
        )
