"""kimi_grpc.media.request: a chat's media parts to the engine's prompt, without a server."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from kimi_grpc.chat import ChatError
from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.config import ConfigError, load_model_config
from kimi_grpc.media import MediaConfig, MediaError, MediaLimits
from kimi_grpc.media.request import chat_prompt, check_media_settings, load_chat, media_inputs
from kimi_grpc.tokenizer import KimiTokenizer


@pytest.fixture(scope="module")
def vl():
    path = demo_checkpoint(preset="demo-vl")
    tokenizer = KimiTokenizer.from_dir(path)
    vision = load_model_config(path).vision_config
    renderer, config = load_chat(path, tokenizer, vision)
    return renderer, config, vision, tokenizer


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def image(data: bytes, mime: str = "") -> dict:
    return {"type": "image", "data": data, "mime_type": mime}


def test_prompt_expands_pads_and_lets_the_bytes_go(vl):
    renderer, config, vision, _ = vl
    messages = [
        {"role": "user", "content": [image(png(), "IMAGE/PNG"), {"type": "text", "text": "hi"}]}
    ]
    prompt = chat_prompt(
        renderer, messages, config, MediaLimits(), pad_id=vision.media_placeholder_token_id
    )
    (span,) = prompt.spans
    pad = vision.media_placeholder_token_id
    assert prompt.rendered.token_ids.count(pad) == 1  # one pad per chunk before expansion
    assert prompt.token_ids[span.offset : span.end] == [pad] * span.chunk.num_tokens
    assert prompt.token_ids.count(pad) == prompt.num_media_tokens == span.chunk.num_tokens
    assert prompt.media[0].input.data == b""  # the encoded bytes are not kept past decoding


def test_chat_errors_come_before_decoding(vl):
    """A bad message is reported as such even when a media part would also fail: the cheap
    checks run before seconds of decoding."""
    renderer, config, vision, _ = vl
    messages = [
        {"role": "user", "content": [image(b"not an image")]},
        {"role": "tool", "content": "x", "tool_call_id": "nope"},
    ]
    with pytest.raises(ChatError) as info:
        chat_prompt(
            renderer, messages, config, MediaLimits(), pad_id=vision.media_placeholder_token_id
        )
    assert info.value.field == "messages[1].tool_call_id"


@pytest.mark.parametrize(
    ("part", "field", "text"),
    [
        ({"type": "image"}, "messages[0].content[0]", "no data bytes"),
        (image(png(), "video/mp4"), "messages[0].content[0]", "mime type"),
        (image(b"GIF89a"), "messages[0].content[0]", ""),
    ],
)
def test_media_errors_name_the_part(vl, part, field, text):
    renderer, config, vision, _ = vl
    messages = [{"role": "user", "content": [part]}]
    with pytest.raises(MediaError) as info:
        chat_prompt(
            renderer, messages, config, MediaLimits(), pad_id=vision.media_placeholder_token_id
        )
    assert info.value.field == field and info.value.message.startswith(field)
    assert text in info.value.message


def test_a_part_type_that_is_not_a_string_is_a_chat_error(vl):
    renderer, *_ = vl
    assert media_inputs([{"role": "user", "content": [{"type": ["image"]}]}]) == []
    with pytest.raises(ChatError) as info:
        renderer.render([{"role": "user", "content": [{"type": ["image"]}]}])
    assert info.value.field == "messages[0].content[0].type"


def test_media_on_a_text_only_model_is_refused(vl):
    renderer, *_ = vl
    with pytest.raises(MediaError, match="no vision tower") as info:
        chat_prompt(renderer, [{"role": "user", "content": [image(png())]}], None, None)
    assert info.value.field == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"patch_size": 16}, "patch_size 16"),
        ({"merge_kernel_size": 4, "patch_limit_on_one_side": 512}, "merge_kernel_size 4"),
        ({"temporal_merge_kernel_size": 8}, "temporal_merge_kernel_size 8"),
        ({"patch_limit_on_one_side": 1024}, "patch_limit_on_one_side 1024"),
    ],
)
def test_preprocessing_the_tower_cannot_encode_is_refused_at_load(vl, change, text):
    _, config, vision, tokenizer = vl
    check_media_settings(config, vision, tokenizer)  # the checkpoint's own settings agree
    with pytest.raises(ConfigError, match=text):
        check_media_settings(dataclasses.replace(config, **change), vision, tokenizer)


def test_a_tokenizer_with_another_pad_id_is_refused_at_load(vl):
    _, config, vision, tokenizer = vl
    other = dataclasses.replace(vision, media_placeholder_token_id=7)
    with pytest.raises(ConfigError, match="media_placeholder_token_id 7"):
        check_media_settings(config, other, tokenizer)
    assert isinstance(config, MediaConfig)
