"""The one exception media preprocessing raises for input it refuses.

Every failure caused by the bytes a client sent (undecodable, unsupported format or codec, over a
limit) is a :class:`MediaError`; anything else escaping this package is a server bug. The server
answers INVALID_ARGUMENT with the message, naming the request part it came from.
"""

from __future__ import annotations

# Stable machine-readable reasons (clients and metrics act on these; messages may change).
UNDECODABLE = "undecodable"  # corrupt, truncated, not a media file at all
UNSUPPORTED = "unsupported"  # a real file in a format / codec we do not accept
TOO_LARGE = "too_large"  # over one of the MediaLimits
EMPTY = "empty"  # zero bytes, zero pixels, zero frames


class MediaError(ValueError):
    """Refused media input: ``message`` says what and why (it never includes the payload);
    ``reason`` is one of the module constants above; ``field`` the request part it came from
    ("" until the request layer knows it)."""

    def __init__(self, message: str, *, reason: str = UNDECODABLE, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field
