"""Images and video through a real server on the demo-vl checkpoint: AgentStep streams a reply,
usage equals Tokenize's count, and every row of the bad-media table is INVALID_ARGUMENT naming the
message part, after which the server still serves with no leaked KV pages."""

from __future__ import annotations

import io
import time

import grpc
import pytest
from PIL import Image

from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.client import KimiClient, chat_message
from kimi_grpc.proto import inference_pb2 as pb
from tests.server_harness import ServerProcess, start_server
from tests.test_media_image import _zip_bytes, png_header_only, synthetic_rgb
from tests.test_media_video import _rawvideo_avi, _zero_frame, encode_video

MAX_ITEMS = 4
MAX_VIDEO_SECONDS = 12
GREEDY = {"max_tokens": 6, "temperature": 0}


def png(width: int = 96, height: int = 72, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_rgb(width, height, seed)).save(buf, "PNG")
    return buf.getvalue()


def white_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, "PNG")
    return buf.getvalue()


def video(seconds: int, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    return encode_video("mp4", "libx264", n=seconds * fps, fps=fps, width=width, height=height)


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def image_part(data: bytes, mime: str = "") -> dict:
    return {"type": "image", "data": data, "mime_type": mime}


def video_part(data: bytes, mime: str = "") -> dict:
    return {"type": "video", "data": data, "mime_type": mime}


TEXT = {"type": "text", "text": "Describe it."}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    path = demo_checkpoint(preset="demo-vl")
    srv = start_server(
        *("--model", str(path), "--max-model-len", "4096"),
        *("--max-media-items", str(MAX_ITEMS), "--max-video-seconds", str(MAX_VIDEO_SECONDS)),
    )
    yield srv
    srv.terminate()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> KimiClient:
    with KimiClient(server.target) as c:
        yield c


def tokenize(client: KimiClient, messages: list[dict]) -> pb.TokenizeResponse:
    chat = pb.ChatInput(messages=[chat_message(m) for m in messages], mode=pb.MODE_INSTANT)
    return client.tokenize(pb.TokenizeRequest(chat=chat))


def idle_pages(client: KimiClient, timeout: float = 10.0) -> int:
    """KV pages in use once nothing runs (waits for the engine to settle)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.server_status()
        if (status.running == 0 and status.waiting == 0) or time.monotonic() > deadline:
            return status.kv_pages_used
        time.sleep(0.05)


def test_model_info_reports_vision_limits(client: KimiClient) -> None:
    info = client.model_info()
    assert info.HasField("vision")
    assert info.vision.max_items == MAX_ITEMS
    assert info.vision.max_video_seconds == MAX_VIDEO_SECONDS
    assert info.vision.sample_fps == 2.0 and info.vision.frames_per_chunk == 4


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([user(image_part(png(), "image/png"), TEXT)], id="image"),
        pytest.param([user(video_part(video(10), "video/mp4"), TEXT)], id="10s-video"),
        pytest.param(
            [user(TEXT, image_part(png(seed=1)), video_part(video(3)), image_part(png(seed=2)))],
            id="mixed",
        ),
    ],
)
def test_agent_step_with_media_streams_and_usage_equals_tokenize(
    client: KimiClient, messages: list[dict]
) -> None:
    tokens = tokenize(client, messages)
    media = [part for part in messages[0]["content"] if part["type"] != "text"]
    assert [(m.message_index, m.part_index) for m in tokens.media] == [
        (0, j) for j, part in enumerate(messages[0]["content"]) if part["type"] != "text"
    ]
    assert len(tokens.media) == len(media)
    videos = [m for m, part in zip(tokens.media, media, strict=True) if part["type"] == "video"]
    if any(part["type"] == "video" for part in media):
        assert videos[0].num_chunks >= 2  # 10 s at 2 fps = 20 frames = 5 chunks; 3 s = 2
        assert "00:00:00.000<|media_begin|>video<|media_content|>" in tokens.text
    responses = list(
        client.agent_step(messages, mode="instant", params=GREEDY)  # the raw stream
    )
    deltas = [r for r in responses if r.HasField("delta")]
    final = responses[-1].final
    assert deltas and responses[-1].HasField("final")
    assert final.usage.prompt_tokens == len(tokens.token_ids)
    assert final.usage.media_tokens == sum(m.num_tokens for m in tokens.media) > 0
    assert final.usage.completion_tokens == sum(len(d.delta.token_ids) for d in deltas) > 0


def test_same_image_again_hits_the_prefix_cache_and_a_different_one_does_not(
    client: KimiClient,
) -> None:
    first = [user(image_part(png(896, 672, seed=5)), TEXT)]  # 192 tokens: 3 of 64-token pages
    other = [user(image_part(png(896, 672, seed=6)), TEXT)]
    pad_start = list(tokenize(client, first).token_ids).index(1813)  # demo <|media_pad|>
    runs = [client.agent_step_result(m, mode="instant", params=GREEDY) for m in (first, other)]
    again = client.agent_step_result(first, mode="instant", params=GREEDY)
    assert runs[1].final.usage.cached_tokens <= pad_start  # nothing past the media is shared
    assert again.final.usage.cached_tokens > pad_start + runs[0].final.usage.media_tokens - 64
    assert again.token_ids == runs[0].token_ids


def _huge_video() -> bytes:
    return encode_video("avi", "mpeg4", n=2, fps=10, width=4200, height=2200)


# (name, messages, field named in the message, text in the message)
BAD_MEDIA = [
    ("truncated png", [user(image_part(png()[:200]))], "messages[0].parts[0]", "corrupt"),
    ("zip renamed .png", [user(image_part(_zip_bytes()))], "messages[0].parts[0]", "not PNG"),
    (
        "50000x50000 png header",
        [user(TEXT, image_part(png_header_only(50_000, 50_000)))],
        "messages[0].parts[1]",
        "over the limit",
    ),
    ("empty image", [user(image_part(b""))], "messages[0].parts[0]", "empty"),
    ("corrupt video", [user(video_part(video(2)[:2000]))], "messages[0].parts[0]", "video"),
    ("png sent as video", [user(video_part(png()))], "messages[0].parts[0]", "video"),
    (
        "zero-frame video",
        [user(video_part(_zero_frame("mp4", "libx264")))],
        "messages[0].parts[0]",
        "no video stream",
    ),
    (
        "unsupported codec",
        [user(video_part(_rawvideo_avi()))],
        "messages[0].parts[0]",
        "rawvideo codec",
    ),
    (
        "video claiming 4200x2200",
        [user(video_part(_huge_video()))],
        "messages[0].parts[0]",
        "pixels",
    ),
    (
        "too many items",
        [user(*[image_part(png(seed=i)) for i in range(MAX_ITEMS + 1)])],
        f"messages[0].parts[{MAX_ITEMS}]",
        "media items",
    ),
    (
        "too many seconds",
        [user(video_part(video(MAX_VIDEO_SECONDS + 3, fps=2)))],
        "messages[0].parts[0]",
        "long",
    ),
    (
        "image in an assistant turn",
        [user(TEXT), {"role": "assistant", "content": [image_part(png())]}, user(TEXT)],
        "messages[1].parts",
        "user turns",
    ),
    (
        "mime type of the other kind",
        [user(image_part(png(), "video/mp4"))],
        "messages[0].parts[0]",
        "mime type",
    ),
    (
        "second message's part",
        [user(TEXT), {"role": "assistant", "content": "ok"}, user(TEXT, image_part(b"GIF89a"))],
        "messages[2].parts[1]",
        "",
    ),
]


@pytest.mark.parametrize(
    ("messages", "field", "text"),
    [pytest.param(m, f, t, id=name) for name, m, f, t in BAD_MEDIA],
)
def test_bad_media_is_invalid_argument_naming_the_part(
    client: KimiClient, messages: list[dict], field: str, text: str
) -> None:
    baseline = idle_pages(client)
    for call, prefix in (
        (lambda: client.agent_step_result(messages, mode="instant", params=GREEDY), ""),
        (lambda: tokenize(client, messages), "chat."),  # TokenizeRequest.chat.messages
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(prefix + field), info.value.details()
        assert text in info.value.details()
    served = client.agent_step_result(
        [user(image_part(png()), TEXT)], mode="instant", params=GREEDY
    )
    assert served.final.usage.completion_tokens > 0  # still serving, media included
    assert idle_pages(client) == baseline  # nothing leaked


def test_extreme_aspect_ratio_is_served_like_moonshots_processor(client: KimiClient) -> None:
    """1 x 100,000 is a valid image: Moonshot's processor maps it to a 512 x 2 patch grid (256
    tokens); it is served in bounded time, not refused."""
    messages = [user(image_part(white_png(1, 100_000)), TEXT)]
    start = time.perf_counter()
    tokens = tokenize(client, messages)
    assert [m.num_tokens for m in tokens.media] == [256]
    result = client.agent_step_result(messages, mode="instant", params=GREEDY)
    assert result.final.usage.media_tokens == 256
    assert time.perf_counter() - start < 20


def test_text_only_checkpoint_refuses_media() -> None:
    srv = start_server("--max-model-len", "512")
    try:
        with KimiClient(srv.target) as client:
            assert not client.model_info().HasField("vision")
            with pytest.raises(grpc.RpcError) as info:
                client.agent_step_result([user(image_part(png()), TEXT)], mode="instant")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("messages[0].parts[0]")
            assert "no vision tower" in info.value.details()
    finally:
        srv.terminate()


def test_content_parts_are_capped_per_request() -> None:
    """Parts are counted before they are converted (a message of millions of empty parts
    would otherwise hold the event loop)."""
    from kimi_grpc.server import convert
    from kimi_grpc.server.errors import ServiceError

    many = pb.ChatMessage(role=pb.ROLE_USER, parts=[pb.ContentPart(text="")] * 3000)
    assert len(convert.messages([many])[0]["content"]) == 3000
    with pytest.raises(ServiceError) as info:
        convert.messages([many, many])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "messages" and str(convert.MAX_PARTS) in info.value.message
