"""Media in the prompt (spec §5): the text that stands for an image / a video, and the expansion
of each ``<|media_pad|>`` to its chunk's token count. Pure string / id helpers.

Order of operations (Moonshot's ``KimiK25Processor``):

1. the chat template renders an image part as :data:`IMAGE_PROMPT` and a video part as the
   checkpoint's video placeholder (``<|kimi_k25_video_placeholder|>``);
2. ``ChatRenderer.render(video_prompts=...)`` substitutes each placeholder, in order, by that
   video's :func:`video_prompt`: one ``{timestamp}<|media_begin|>video<|media_content|><|media_pad|>
   <|media_end|>`` per chunk, concatenated with no separator;
3. tokenize (one ``<|media_pad|>`` id per image / chunk);
4. :func:`expand_media_pads` repeats each pad id N times (N = that chunk's token count), images
   and video chunks in prompt order; the vision embeddings later replace exactly those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kimi_grpc.media.errors import MediaError

MEDIA_BEGIN = "<|media_begin|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_END = "<|media_end|>"
MEDIA_PAD = "<|media_pad|>"
MEDIA_PAD_ID = 163605  # config.json media_placeholder_token_id (K2.5 / K2.6)
IMAGE_PROMPT = f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"


def video_chunk_prompt(timestamp: str) -> str:
    """``00:00:02.100<|media_begin|>video<|media_content|><|media_pad|><|media_end|>``"""
    return f"{timestamp}{MEDIA_BEGIN}video{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"


def video_prompt(timestamps: Sequence[str]) -> str:
    """A whole video: its chunks' prompts concatenated (no separator)."""
    return "".join(video_chunk_prompt(ts) for ts in timestamps)


@dataclass(frozen=True)
class ExpandedPrompt:
    """Token ids with every media pad expanded, and where each chunk's pads sit."""

    token_ids: list[int]
    spans: list[tuple[int, int]]  # per chunk, in prompt order: (offset, length) in token_ids


def expand_media_pads(
    token_ids: Sequence[int], chunk_tokens: Sequence[int], pad_id: int = MEDIA_PAD_ID
) -> ExpandedPrompt:
    """Repeats the i-th ``pad_id`` in ``token_ids`` ``chunk_tokens[i]`` times (every image and
    video chunk of the request, in prompt order). Raises :class:`MediaError` when the number of
    pads is not the number of chunks (e.g. user text that spells ``<|media_pad|>``)."""
    pads = sum(1 for token in token_ids if token == pad_id)
    if pads != len(chunk_tokens):
        raise MediaError(
            f"the prompt has {pads} {MEDIA_PAD} tokens for {len(chunk_tokens)} images / video "
            "chunks"
        )
    if any(n < 1 for n in chunk_tokens):
        raise ValueError(f"every chunk costs at least one token, got {list(chunk_tokens)}")
    out: list[int] = []
    spans: list[tuple[int, int]] = []
    chunk = 0
    for token in token_ids:
        if token == pad_id:
            n = chunk_tokens[chunk]
            spans.append((len(out), n))
            out.extend([pad_id] * n)
            chunk += 1
        else:
            out.append(token)
    return ExpandedPrompt(out, spans)
