"""AgentStep responses → Chat Completions objects: stream chunks and the non-stream completion.

Wire rules (what the clients' accumulators need; docs/HTTP_API.md):
- the first chunk carries ``{"role": "assistant", "content": ""}``; every chunk has the same
  ``id``, ``object``, ``created`` and ``model``;
- reasoning goes out as ``reasoning_content`` (Moonshot's and SGLang's name), never as ``""``;
- a tool call's ``id``, ``type`` and ``function.name`` appear only in its first delta, with
  ``index`` counting the turn's calls from 0; its arguments follow in pieces; one call is finished
  before the next starts (the parser emits them in order) and each chunk holds one call;
- the finish chunk has an empty delta and the finish reason; the usage chunk (``choices: []``)
  follows only with ``stream_options.include_usage``.
"""

from __future__ import annotations

from typing import Any

from kimi_grpc.http.chat_request import ChatCompletionCall
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.tokenizer import KimiTokenizer

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def finish_reason(final: pb.AgentStepFinal, call: ChatCompletionCall) -> str:
    """OpenAI's rule: "tool_calls" when calls were made under auto/required, "stop" when the
    request named the function."""
    reason = FINISH_REASONS[final.finish_reason]
    return "stop" if reason == "tool_calls" and call.named_tool else reason


def usage(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


class TokenText:
    """Token ids → the strings and bytes OpenAI's logprobs carry."""

    def __init__(self, tokenizer: KimiTokenizer) -> None:
        self.tokenizer = tokenizer

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    def chat_logprobs(self, logprobs: list[pb.TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for lp in logprobs:
            item = self.entry(lp.token_id, lp.logprob)
            item["top_logprobs"] = [self.entry(t.token_id, t.logprob) for t in lp.top_logprobs]
            out.append(item)
        return out


class ChatStream:
    """Builds the chunks of one streamed completion."""

    def __init__(
        self, call: ChatCompletionCall, completion_id: str, created: int, tokens: TokenText
    ) -> None:
        self.call = call
        self.tokens = tokens
        self.head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
        }

    def _chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def first(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, d: pb.AgentStepDelta) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        text: dict[str, Any] = {}
        if d.reasoning:
            text["reasoning_content"] = d.reasoning
        if d.content:
            text["content"] = d.content
        if text:
            chunks.append(self._chunk(text))
        for call in d.tool_calls:
            piece: dict[str, Any] = {"index": call.index}
            if call.id:  # the call's first delta
                piece.update(id=call.id, type="function")
                piece["function"] = {"name": call.name, "arguments": call.arguments}
            else:
                piece["function"] = {"arguments": call.arguments}
            last = chunks[-1]["choices"][0]["delta"].get("tool_calls") if chunks else None
            if last and last[-1]["index"] == call.index:  # same call: append to its piece
                last[-1]["function"]["arguments"] += call.arguments
            else:
                chunks.append(self._chunk({"tool_calls": [piece]}))
        if self.call.logprobs and d.logprobs:
            entries = {"content": self.tokens.chat_logprobs(list(d.logprobs))}
            if chunks:
                chunks[0]["choices"][0]["logprobs"] = entries
            else:  # tokens with no text of their own (e.g. a marker): an empty delta
                chunks.append(self._chunk({}, logprobs=entries))
        return chunks

    def final(self, final: pb.AgentStepFinal) -> list[dict[str, Any]]:
        chunks = [self._chunk({}, finish_reason(final, self.call))]
        if self.call.include_usage:
            chunks.append({**self.head, "choices": [], "usage": usage(final.usage)})
        return chunks


def completion(
    call: ChatCompletionCall,
    completion_id: str,
    created: int,
    final: pb.AgentStepFinal,
    logprobs: list[pb.TokenLogprob],
    tokens: TokenText,
) -> dict[str, Any]:
    """The non-stream ``chat.completion`` object."""
    msg = final.message
    message: dict[str, Any] = {
        "role": "assistant",
        "content": msg.content if msg.HasField("content") else None,
    }
    if msg.HasField("reasoning_content"):
        message["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in msg.tool_calls
        ]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": tokens.chat_logprobs(logprobs)} if call.logprobs else None,
        "finish_reason": finish_reason(final, call),
    }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": call.model,
        "choices": [choice],
        "usage": usage(final.usage),
    }
