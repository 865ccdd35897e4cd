"""Per-request sampling parameters: vLLM's names, defaults and ranges, validated on construction.

Every rule raises :class:`SamplingParamsError` (a ``ValueError``) whose ``field`` names the
offending parameter, so the server can map it to ``INVALID_ARGUMENT`` and name the bad field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16  # completions per prompt
MAX_LOGPROBS = 20  # top logprobs per sampled token
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_SEED = 2**63  # exclusive
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value):
        kind = "an integer or None" if allow_none else "an integer"
        raise SamplingParamsError(name, f"must be {kind}, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    """A finite real number (int or float, not bool), returned as float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SamplingParamsError(name, f"must be finite, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(name, f"must be a bool, got {value!r}")
    return value


def _token_ids(name: str, value: Any) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise SamplingParamsError(name, f"must be a list of token ids, got {value!r}")
    ids = list(value)
    for token_id in ids:
        if not _is_int(token_id):
            raise SamplingParamsError(name, f"must contain integer token ids, got {token_id!r}")
        if token_id < 0:
            raise SamplingParamsError(name, f"must contain token ids >= 0, got {token_id}")
    return ids


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise SamplingParamsError("stop", f"must be a string or a list of strings, got {value!r}")
    stops = list(value)
    if len(stops) > MAX_STOP_STRINGS:
        raise SamplingParamsError(
            "stop", f"must have at most {MAX_STOP_STRINGS} strings, got {len(stops)}"
        )
    for stop in stops:
        if not isinstance(stop, str):
            raise SamplingParamsError("stop", f"must contain strings, got {stop!r}")
        if not stop:
            raise SamplingParamsError("stop", "must not contain empty strings")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError(
                "stop",
                f"strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(stop)}",
            )
    return stops


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SamplingParamsError(
            "logit_bias", f"must be a dict of token id -> bias, got {value!r}"
        )
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingParamsError(
            "logit_bias", f"must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}"
        )
    bias: dict[int, float] = {}
    for token_id, amount in value.items():
        if not _is_int(token_id) or token_id < 0:
            raise SamplingParamsError(
                "logit_bias", f"keys must be token ids (integers >= 0), got {token_id!r}"
            )
        amount = _float("logit_bias", amount)
        if not -100.0 <= amount <= 100.0:
            raise SamplingParamsError(
                "logit_bias", f"values must be in [-100, 100], got {amount} for token {token_id}"
            )
        bias[token_id] = amount
    return bias


@dataclass
class SamplingParams:
    """How to sample one prompt's completions. Fields, defaults and ranges follow vLLM's
    ``SamplingParams``; ``max_tokens=None`` means "up to the context limit" (engine resolves it).
    ``__post_init__`` validates and normalises: numbers become ``float``, ``stop`` a list,
    ``stop_token_ids`` a list, ``logit_bias`` a ``{int: float}`` dict or None."""

    n: int = 1
    temperature: float = 1.0  # < GREEDY_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # (0, 2]
    seed: int | None = None  # [0, 2**63)
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # None = off; k = sampled token's logprob + k top logprobs
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.n = _int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {MAX_N}], got {self.n}")

        self.temperature = _float("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        self.top_p = _float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError(
                "top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}"
            )
        self.min_p = _float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if not 0 < self.repetition_penalty <= 2:
            raise SamplingParamsError(
                "repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}"
            )

        self.seed = _int("seed", self.seed, allow_none=True)
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise SamplingParamsError("seed", f"must be in [0, 2^63), got {self.seed}")

        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        self.include_stop_str_in_output = _bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)

        self.max_tokens = _int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        self.min_tokens = _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )

        self.logprobs = _int("logprobs", self.logprobs, allow_none=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(
                "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"
            )
        self.logit_bias = _logit_bias(self.logit_bias)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate_token_ids(self, vocab_size: int) -> None:
        """Checks the token ids the request names (``stop_token_ids``, ``logit_bias`` keys) exist in
        a vocabulary of ``vocab_size`` tokens; call it once the model is known."""
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise SamplingParamsError(
                    "stop_token_ids",
                    f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
                )
        for token_id in self.logit_bias or ():
            if token_id >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias",
                    f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
                )

    def completion_seed(self, index: int) -> int | None:
        """The seed of completion ``index`` (0..n-1): ``seed + index`` (mod 2^63) like vLLM's
        parallel sampling, so the n completions of a seeded request differ yet are reproducible."""
        if self.seed is None:
            return None
        return (self.seed + index) % MAX_SEED
