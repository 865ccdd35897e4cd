"""One request's media, from the parts a client sent to the prompt the engine runs.

    inputs  = media_inputs(messages)              # the image / video parts, in prompt order
    media   = preprocess_media(inputs, ...)       # decode + resize (blocking: off the event loop)
    chat    = renderer.render(..., video_prompts=video_prompts(media))
    prompt  = media_prompt(chat.token_ids, media) # pads expanded; one MediaSpan per chunk

:func:`chat_prompt` does all four.

A message's media part is ``{"type": "image" | "image_url" | "video" | "video_url", "data":
bytes, "mime_type": str}`` (``mime_type`` optional); the chat renderer sees only its type. Every
refusal is a :class:`MediaError` whose ``field`` names the part (``messages[0].content[1]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kimi_grpc.chat import MEDIA_PART_TYPES, ChatRenderer, RenderedChat
from kimi_grpc.config import ConfigError, VisionConfig
from kimi_grpc.media.chunk import MediaKind, VisionChunk
from kimi_grpc.media.config import PREPROCESSOR_CONFIG, MediaConfig, MediaLimits
from kimi_grpc.media.errors import UNSUPPORTED, MediaError
from kimi_grpc.media.image import preprocess_image
from kimi_grpc.media.prompt import MEDIA_PAD, MEDIA_PAD_ID, expand_media_pads, video_prompt
from kimi_grpc.media.video import preprocess_video
from kimi_grpc.tokenizer import KimiTokenizer


@dataclass(frozen=True, eq=False)
class MediaInput:
    """One media part as the client sent it."""

    kind: MediaKind
    data: bytes
    field: str  # the request path of the part, for error messages
    mime_type: str = ""
    message_index: int = 0
    part_index: int = 0


@dataclass(frozen=True, eq=False)
class PreparedMedia:
    """One media part, preprocessed: an image's single chunk or a video's chunks in order."""

    input: MediaInput
    chunks: tuple[VisionChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


@dataclass(frozen=True, eq=False)
class MediaSpan:
    """Where one chunk's embeddings go: prompt positions ``[offset, offset + chunk.num_tokens)``
    (all ``<|media_pad|>``)."""

    offset: int
    chunk: VisionChunk

    @property
    def end(self) -> int:
        return self.offset + self.chunk.num_tokens


def media_inputs(messages: Sequence[Mapping], field: str = "messages") -> list[MediaInput]:
    """The media parts of ``messages`` (OpenAI-style dicts), in prompt order. Only the parts'
    payloads are checked here; the chat renderer validates everything else."""
    found: list[MediaInput] = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list | tuple):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            kind = MEDIA_PART_TYPES.get(kind) if isinstance(kind, str) else None
            if kind is None:
                continue
            where = f"{field}[{i}].content[{j}]"
            data, mime = part.get("data"), part.get("mime_type") or ""
            if not isinstance(data, bytes | bytearray | memoryview):
                raise MediaError(f"{where}: the {kind} has no data bytes", field=where)
            if not isinstance(mime, str) or (mime and not mime.lower().startswith(f"{kind}/")):
                raise MediaError(
                    f"{where}: mime type {mime!r} is not an {kind} type ({kind}/...)",
                    reason=UNSUPPORTED,
                    field=where,
                )
            found.append(MediaInput(kind, bytes(data), where, mime, i, j))
    return found


def preprocess_media(
    inputs: Sequence[MediaInput],
    config: MediaConfig,
    limits: MediaLimits,
    *,
    video_threads: int = 0,
) -> list[PreparedMedia]:
    """Decodes and preprocesses every part (blocking: seconds for a long video), charging each
    against the request's ``max_media_tokens`` before its pixels are decoded."""
    try:
        limits.check_items(len(inputs))
    except MediaError as exc:  # named by the first part over the limit
        where = inputs[limits.max_items].field
        raise MediaError(f"{where}: {exc.message}", reason=exc.reason, field=where) from None
    left = limits.max_media_tokens
    prepared: list[PreparedMedia] = []
    for item in inputs:
        try:
            if item.kind == "image":
                chunks: tuple[VisionChunk, ...] = (
                    preprocess_image(item.data, config, limits, max_tokens=left),
                )
            else:
                video = preprocess_video(
                    item.data, config, limits, max_tokens=left, threads=video_threads
                )
                chunks = video.chunks
        except MediaError as exc:
            raise MediaError(
                f"{item.field}: {exc.message}", reason=exc.reason, field=item.field
            ) from None
        # The encoded bytes are not needed past this point (the chunks hold the pixels).
        media = PreparedMedia(replace(item, data=b""), chunks)
        left -= media.num_tokens
        prepared.append(media)
    return prepared


def video_prompts(media: Sequence[PreparedMedia]) -> list[str]:
    """The text replacing each video's placeholder: one timestamped span per chunk."""
    return [
        video_prompt([chunk.timestamp or "" for chunk in item.chunks])
        for item in media
        if item.input.kind == "video"
    ]


def media_prompt(
    token_ids: Sequence[int], media: Sequence[PreparedMedia], pad_id: int = MEDIA_PAD_ID
) -> tuple[list[int], list[MediaSpan]]:
    """The rendered prompt's ids with each ``<|media_pad|>`` expanded to its chunk's token
    count, and the chunks' spans in prompt order."""
    chunks = [chunk for item in media for chunk in item.chunks]
    expanded = expand_media_pads(token_ids, [c.num_tokens for c in chunks], pad_id)
    spans = [MediaSpan(offset, c) for (offset, _), c in zip(expanded.spans, chunks, strict=True)]
    return expanded.token_ids, spans


@dataclass(frozen=True, eq=False)
class ChatPrompt:
    """A chat ready for the engine: ``token_ids`` (media pads expanded) and ``spans`` go to
    ``add_request(prompt, media=spans)``; ``rendered.token_ids`` has one pad per chunk."""

    rendered: RenderedChat
    token_ids: list[int]
    spans: list[MediaSpan]
    media: list[PreparedMedia]

    @property
    def num_media_tokens(self) -> int:
        return sum(item.num_tokens for item in self.media)


def chat_prompt(
    renderer: ChatRenderer,
    messages: Sequence[Mapping],
    config: MediaConfig | None,
    limits: MediaLimits | None,
    *,
    pad_id: int = MEDIA_PAD_ID,
    field: str = "messages",
    **render_kwargs: object,
) -> ChatPrompt:
    """Preprocesses the media parts of ``messages``, renders the chat (``render_kwargs`` go to
    :meth:`ChatRenderer.render`) and expands the media pads. ``config`` None: the model has no
    vision tower, and any media part is refused. Blocking: run it off the event loop."""
    inputs = media_inputs(messages, field)
    if inputs and (config is None or limits is None):
        raise MediaError(
            f"{inputs[0].field}: this model has no vision tower; it takes text only",
            reason=UNSUPPORTED,
            field=inputs[0].field,
        )
    if inputs:  # the messages' own errors first, before seconds of decoding (a cheap render)
        videos = sum(1 for item in inputs if item.kind == "video")
        renderer.render(messages, video_prompts=[""] * videos, **render_kwargs)
    media = preprocess_media(inputs, config, limits) if inputs else []
    rendered = renderer.render(messages, video_prompts=video_prompts(media), **render_kwargs)
    if not media:
        return ChatPrompt(rendered, rendered.token_ids, [], [])
    token_ids, spans = media_prompt(rendered.token_ids, media, pad_id)
    return ChatPrompt(rendered, token_ids, spans, media)


def load_chat(
    model_dir: str | Path, tokenizer: KimiTokenizer, vision: VisionConfig | None
) -> tuple[ChatRenderer, MediaConfig | None]:
    """The checkpoint's chat renderer (with its video placeholder) and, for a checkpoint with a
    vision tower, its ``media_proc_cfg`` (None: text only, media parts are refused)."""
    if vision is None:
        return ChatRenderer.from_model_dir(model_dir, tokenizer), None
    renderer = ChatRenderer.from_model_dir(
        model_dir, tokenizer, video_placeholder=vision.video_placeholder
    )
    config = MediaConfig.from_model_dir(model_dir)
    check_media_settings(config, vision, tokenizer)
    return renderer, config


def check_media_settings(
    config: MediaConfig, vision: VisionConfig, tokenizer: KimiTokenizer
) -> None:
    """Refuses (ConfigError, at start-up) a ``media_proc_cfg`` whose chunks the vision tower
    could not encode, or a tokenizer whose ``<|media_pad|>`` is not the config's placeholder:
    found on the first image instead, either would fail every media request."""
    kernel = vision.merge_kernel_size
    problems = []
    if config.patch_size != vision.patch_size:
        problems.append(f"patch_size {config.patch_size} != vision_config's {vision.patch_size}")
    if (config.merge_kernel_size, config.merge_kernel_size) != tuple(kernel):
        problems.append(f"merge_kernel_size {config.merge_kernel_size} != vision_config's {kernel}")
    if config.temporal_merge_kernel_size > vision.init_pos_emb_time:
        problems.append(
            f"temporal_merge_kernel_size {config.temporal_merge_kernel_size} > vision_config's "
            f"init_pos_emb_time {vision.init_pos_emb_time}"
        )
    side = min(vision.rope_max_height, vision.rope_max_width)
    if config.patch_limit_on_one_side > side:
        problems.append(
            f"patch_limit_on_one_side {config.patch_limit_on_one_side} > the 2D RoPE table {side}"
        )
    pad = tokenizer.special_tokens.get(MEDIA_PAD)
    if pad != vision.media_placeholder_token_id:
        problems.append(
            f"the tokenizer's {MEDIA_PAD} is {pad}, config.json's media_placeholder_token_id "
            f"{vision.media_placeholder_token_id}"
        )
    if problems:
        raise ConfigError(f"{PREPROCESSOR_CONFIG} / config.json disagree: " + "; ".join(problems))
