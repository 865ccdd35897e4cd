"""Reading an OpenAI request body: typed fields with errors that name them, and the sampling
fields both endpoints share.

Every check raises :class:`~kimi_grpc.server.errors.ServiceError` INVALID_ARGUMENT (HTTP 400) whose
``field`` is the body path as the client wrote it (``messages[2].content[0].type``,
``tools[0].function.parameters``). ``null`` means "not given" everywhere, as in OpenAI's API.
"""

from __future__ import annotations

import math
import re
from typing import Any

import grpc

from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server.errors import ServiceError, invalid

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024
INT32_MAX = 2**31 - 1
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only (str.isdigit also takes "²", "٣")


class Fields:
    """A JSON object from the body, read field by field; ``path`` prefixes error fields."""

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            raise invalid(path or "body", f"must be a JSON object, got {_kind(data)}")
        self.data = data
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def any(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is not None and not isinstance(value, str):
            raise invalid(self.where(key), f"must be a string, got {_kind(value)}")
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise invalid(self.where(key), f"must be true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(self.where(key), f"must be an integer, got {_kind(value)}")
        _check_range(self.where(key), value, low, high)
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise invalid(self.where(key), f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise invalid(self.where(key), "must be a finite number")
        _check_range(self.where(key), value, low, high)
        return float(value)

    def array(self, key: str, *, required: bool = False) -> list | None:
        value = self._get(key, required)
        if value is not None and not isinstance(value, list):
            raise invalid(self.where(key), f"must be an array, got {_kind(value)}")
        return value

    def object(self, key: str) -> Fields | None:
        value = self.data.get(key)
        return None if value is None else Fields(value, self.where(key))

    def choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.string(key)
        if value is not None and value not in allowed:
            raise invalid(self.where(key), f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def refuse(self, key: str, message: str) -> None:
        """Refuses a field that is given (not null)."""
        if self.has(key):
            raise invalid(self.where(key), message)

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            raise invalid(self.where(key), "is required")
        return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value}"
    return names.get(type(value), type(value).__name__)


def _check_range(field: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise invalid(field, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise invalid(field, f"must be <= {high}, got {value}")


def model_name(body: Fields, served: str, aliases: tuple[str, ...]) -> str:
    """The model the request names (the served name when omitted); unknown → 404."""
    name = body.string("model")
    if name is None:
        return served
    if name != served and name not in aliases:
        raise ServiceError(
            grpc.StatusCode.NOT_FOUND, f"The model {name!r} does not exist.", field="model"
        )
    return name


def sampling(body: Fields, *, max_tokens_fields: tuple[str, ...]) -> pb.SamplingParams:
    """The sampling fields of both endpoints (OpenAI's plus vLLM's extras) as the proto; ``n``
    is each endpoint's own.

    Ranges are checked again by SamplingParams; errors from there name ``sampling.X``, which the
    HTTP error mapping renames to ``X``."""
    params = pb.SamplingParams()
    for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if (value := body.number(key)) is not None:
            setattr(params, key, value)
    for key in ("presence_penalty", "frequency_penalty"):
        if (value := body.number(key, -2.0, 2.0)) is not None:
            setattr(params, key, value)
    if (value := body.integer("top_k", -1, INT32_MAX)) is not None:
        params.top_k = value
    if (value := body.integer("seed")) is not None:
        params.seed = value % 2**63  # OpenAI seeds may be negative; the engine's are unsigned
    for key in max_tokens_fields:  # the first one given wins (max_completion_tokens first)
        if (value := body.integer(key, 1)) is not None:
            params.max_tokens = min(value, INT32_MAX)
            break
    if (value := body.integer("min_tokens", 0, INT32_MAX)) is not None:
        params.min_tokens = value
    params.ignore_eos = bool(body.boolean("ignore_eos"))
    params.include_stop_str_in_output = bool(body.boolean("include_stop_str_in_output"))
    params.stop.extend(_stop_strings(body))
    for i, token in enumerate(body.array("stop_token_ids") or []):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**32:
            raise invalid(f"stop_token_ids[{i}]", "must be a token id (a non-negative integer)")
        params.stop_token_ids.append(token)
    if (bias := body.object("logit_bias")) is not None:
        if len(bias.data) > MAX_LOGIT_BIAS:
            raise invalid("logit_bias", f"holds more than {MAX_LOGIT_BIAS} entries")
        for key in bias.data:
            if not TOKEN_ID.fullmatch(key) or int(key) >= 2**32:
                raise invalid("logit_bias", f"keys must be token ids; got {key!r}")
            value = bias.number(key, -100.0, 100.0)
            if value is None:
                raise invalid(f"logit_bias.{key}", "must be a number")
            params.logit_bias[int(key)] = value
    return params


def _stop_strings(body: Fields) -> list[str]:
    stop = body.any("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "must be a non-empty string or an array of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"holds {len(stops)} strings; the limit is {MAX_STOP_STRINGS}")
    return stops
