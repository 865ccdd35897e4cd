"""Finished (or in-progress) results of a request, folded from the engine's per-step deltas."""

from __future__ import annotations

from dataclasses import dataclass, field

from kimi_grpc.engine.llm_engine import SequenceDelta


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    error: str | None = None  # why the engine failed it (finish_reason "abort")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    # The first completion, for the common n == 1 case.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    def apply(self, delta: SequenceDelta) -> None:
        out = self.outputs[delta.index]
        out.token_ids.extend(delta.token_ids)
        out.text += delta.text
        out.logprobs.extend(delta.logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finished:
            out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
            out.error = delta.error
