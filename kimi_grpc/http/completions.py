"""``POST /v1/completions``: OpenAI's legacy text completions on the Generate path.

``prompt`` is a string, an array of strings, an array of token ids or an array of those arrays;
each prompt is one Generate request (with ``n`` completions) and choice ``i * n + k`` is prompt
``i``'s completion ``k``. Special-token spellings in a text prompt are honoured
(``<|im_end|>`` becomes its token): the raw-completions use (MoonshotAI's "manually parsing tool
calls", the K2 Vendor Verifier's ``--use-raw-completions``) posts a prompt the client rendered with
the chat template and reads the tool-call markers back from ``text`` (Kimi's tool markers are
not skipped by ``skip_special_tokens``). ``max_tokens`` defaults to 16, as in OpenAI's API.
``response_format`` (json_object / json_schema) constrains every completion from its first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kimi_grpc.http.chat_request import response_format
from kimi_grpc.http.chat_response import TokenText
from kimi_grpc.http.fields import Fields, model_name, sampling
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server.errors import invalid

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 64
MAX_LOGPROBS = 20
MAX_N = 16
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class CompletionCall:
    requests: list[pb.GenerateRequest]  # one per prompt
    prompts: list[str | list[int]]  # as given (for echo)
    model: str
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def completion_call(data: object, served: str, aliases: tuple[str, ...]) -> CompletionCall:
    body = Fields(data)
    model = model_name(body, served, aliases)
    prompts = _prompts(body.any("prompt"))
    body.refuse("suffix", "is not supported (no fill-in-the-middle)")
    n = body.integer("n", 1, MAX_N) or 1
    best_of = body.integer("best_of", 1)
    if best_of is not None and best_of != n:
        raise invalid("best_of", "is not supported (it must equal n)")
    logprobs = body.integer("logprobs", 0, MAX_LOGPROBS)
    echo = bool(body.boolean("echo"))
    if echo and logprobs is not None:
        raise invalid("echo", "cannot be combined with logprobs (no prompt logprobs)")
    params = sampling(body, max_tokens_fields=("max_tokens",))
    if not params.HasField("max_tokens"):
        params.max_tokens = DEFAULT_MAX_TOKENS
    params.n = n
    if logprobs is not None:
        params.logprobs = logprobs
    if (skip := body.boolean("skip_special_tokens")) is not None:
        params.skip_special_tokens = skip
    requests = []
    for prompt in prompts:
        request = pb.GenerateRequest(sampling=params, allow_special_tokens=True)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        if (key := body.string("prompt_cache_key")) is not None:
            request.session_id = key
        response_format(body, request.response_format)  # JSON from the first token
        requests.append(request)
    stream = bool(body.boolean("stream"))
    options = body.object("stream_options")
    return CompletionCall(
        requests=requests,
        prompts=prompts,
        model=model,
        n=n,
        stream=stream,
        include_usage=bool(stream and options is not None and options.boolean("include_usage")),
        logprobs=logprobs,
        echo=echo,
    )


def _prompts(prompt: Any) -> list[str | list[int]]:
    def token_ids(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value
        )

    if isinstance(prompt, str):
        return [prompt]
    if token_ids(prompt) and prompt:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_PROMPTS:
            raise invalid("prompt", f"holds {len(prompt)} prompts; the limit is {MAX_PROMPTS}")
        for i, item in enumerate(prompt):
            if not (isinstance(item, str) or (token_ids(item) and item)):
                raise invalid(f"prompt[{i}]", "must be a string or a non-empty array of token ids")
        return list(prompt)
    raise invalid("prompt", "is required: a string, an array of strings or an array of token ids")


class CompletionBuilder:
    """Turns Generate responses of every prompt into choices (streamed or whole)."""

    def __init__(
        self, call: CompletionCall, completion_id: str, created: int, tokens: TokenText
    ) -> None:
        self.call = call
        self.tokens = tokens
        self.head = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": call.model,
        }
        count = len(call.prompts) * call.n
        self.texts = [""] * count
        self.offsets = [0] * count  # characters so far (text_offset of the next token)
        self.logprobs: list[dict[str, list]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for _ in range(count)
        ]
        self.finish: list[str | None] = [None] * count
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def echo_text(self, prompt_index: int) -> str:
        prompt = self.call.prompts[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return self.tokens.tokenizer.decode(prompt)

    def echo_chunk(self, prompt_index: int, index: int) -> dict[str, Any]:
        """Stream with echo: the prompt as its choice's first text."""
        i = self.choice_index(prompt_index, index)
        choice = {"index": i, "text": self.echo_text(prompt_index), "logprobs": None}
        return self.chunk([{**choice, "finish_reason": None}])

    def choice_index(self, prompt_index: int, index: int) -> int:
        return prompt_index * self.call.n + index

    def delta(self, prompt_index: int, d: pb.GenerateDelta) -> dict[str, Any] | None:
        """Records a delta; returns its stream choice (None when it carries nothing)."""
        i = self.choice_index(prompt_index, d.index)
        entries = self._logprobs(i, d) if self.call.logprobs is not None else None
        self.texts[i] += d.text
        self.offsets[i] += len(d.text)
        if not d.text and entries is None:
            return None
        return {"index": i, "text": d.text, "logprobs": entries, "finish_reason": None}

    def _logprobs(self, i: int, d: pb.GenerateDelta) -> dict[str, list]:
        piece: dict[str, list] = {k: [] for k in self.logprobs[i]}
        offset = self.offsets[i]
        for lp in d.logprobs:
            token = self.tokens.entry(lp.token_id, lp.logprob)["token"]
            piece["tokens"].append(token)
            piece["token_logprobs"].append(lp.logprob)
            piece["top_logprobs"].append(
                {self.tokens.entry(t.token_id, 0.0)["token"]: t.logprob for t in lp.top_logprobs}
            )
            piece["text_offset"].append(offset)
            offset += len(token)
        for key, values in piece.items():
            self.logprobs[i][key].extend(values)
        return piece

    def final(self, prompt_index: int, final: pb.GenerateFinal) -> dict[str, Any]:
        i = self.choice_index(prompt_index, final.index)
        if final.index == 0:  # prompt tokens count once per prompt
            self.usage["prompt_tokens"] += final.usage.prompt_tokens
        self.usage["completion_tokens"] += final.usage.completion_tokens
        self.finish[i] = FINISH_REASONS[final.finish_reason]
        return {"index": i, "text": "", "logprobs": None, "finish_reason": self.finish[i]}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head, "choices": choices}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": self.usage_object()}

    def usage_object(self) -> dict[str, Any]:
        u = self.usage
        return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def completion(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            if self.call.echo:
                text = self.echo_text(i // self.call.n) + text
            logprobs = self.logprobs[i] if self.call.logprobs is not None else None
            choices.append(
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": self.finish[i]}
            )
        return {**self.head, "choices": choices, "usage": self.usage_object()}
