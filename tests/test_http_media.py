"""Images and video through the OpenAI-compatible HTTP API.

Unit tests: ``image_url`` / ``video_url`` parts of a chat body → ``ChatMessage.parts`` (order,
bytes, mime type) and every refusal as a 400 naming the body path. End to end: a real
``kimi-grpc serve --http-port`` on the ``demo-vl`` checkpoint (CPU), driven by the official
``openai`` client and raw HTTP, with the gRPC Tokenize of the same chat as the reference.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.client import KimiClient
from kimi_grpc.http.chat_request import chat_completion_call
from kimi_grpc.http.errors import HttpError
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.server.errors import ServiceError
from tests.server_harness import ServerProcess, running_server

VL_MODEL = "kimi-vl-demo"
NO_THINKING = {"thinking": {"type": "disabled"}}
QUESTION = "What is in this picture?"
IMAGE = b"\x89PNG\r\n\x1a\n-not-decoded-here-"  # translation never decodes the image itself
VIDEO = b"\x00\x00\x00\x18ftypmp42-not-decoded-here-"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(width: int = 56, height: int = 42) -> bytes:
    image = Image.new("RGB", (width, height), (30, 120, 200))
    image.paste((250, 5, 120), (0, 0, width // 2, height // 2))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def image_part(url: str, **extra: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def translate(*messages: dict) -> pb.AgentStepRequest:
    return chat_completion_call({"messages": list(messages)}, VL_MODEL, ()).step


def refusal(*messages: dict) -> HttpError:
    with pytest.raises(ServiceError) as err:
        translate(*messages)
    return HttpError.from_service(err.value)


# ---- body -> proto ------------------------------------------------------------------------------


def test_media_parts_become_message_parts_in_order() -> None:
    step = translate(
        {"role": "system", "content": "Be brief."},
        user(
            text("Compare "),
            image_part(data_url(IMAGE), detail="high"),
            {"type": "text", "text": " with "},
            {"type": "video_url", "video_url": {"url": data_url(VIDEO, "video/mp4")}},
            {"type": "image_url", "image_url": data_url(b"GIF89a", "image/gif")},  # a plain URL
            text("."),
        ),
    )
    system, message = step.messages
    assert system.content == "Be brief." and not system.parts
    assert message.role == pb.ROLE_USER
    assert not message.HasField("content")
    kinds = [p.WhichOneof("part") for p in message.parts]
    assert kinds == ["text", "image", "text", "video", "image", "text"]
    texts = [p.text for p in message.parts if p.WhichOneof("part") == "text"]
    assert texts == ["Compare ", " with ", "."]
    first, video, gif = message.parts[1].image, message.parts[3].video, message.parts[4].image
    assert (first.data, first.mime_type) == (IMAGE, "image/png")
    assert (video.data, video.mime_type) == (VIDEO, "video/mp4")
    assert (gif.data, gif.mime_type) == (b"GIF89a", "image/gif")


def test_bytes_round_trip_exactly() -> None:
    data = bytes(range(256)) * 64
    (message,) = translate(user(image_part(data_url(data, "image/webp")))).messages
    assert message.parts[0].image.data == data


@pytest.mark.parametrize(
    ("url", "mime"),
    [
        (f"data:Image/PNG;base64,{base64.b64encode(IMAGE).decode()}", "image/png"),
        (f"data:image/png;name=cat.png;base64,{base64.b64encode(IMAGE).decode()}", "image/png"),
        (f"DATA:image/jpeg;BASE64,{base64.b64encode(IMAGE).decode()}", "image/jpeg"),
        (f"data:;base64,{base64.b64encode(IMAGE).decode()}", ""),  # the bytes decide the format
    ],
)
def test_the_mime_type_comes_from_the_url(url: str, mime: str) -> None:
    (message,) = translate(user(image_part(url))).messages
    assert (message.parts[0].image.data, message.parts[0].image.mime_type) == (IMAGE, mime)


def test_wrapped_base64_is_accepted() -> None:
    """Line breaks and spaces inside the payload (76-column MIME encoders) are skipped."""
    data = IMAGE * 8
    encoded = base64.encodebytes(data).decode()  # a newline every 76 characters
    assert "\n" in encoded.strip()
    (message,) = translate(user(image_part(f"data:image/png;base64, {encoded}"))).messages
    assert message.parts[0].image.data == data


@pytest.mark.parametrize("detail", ["auto", "low", "high", "original", None])
def test_detail_is_accepted_and_ignored(detail: str | None) -> None:
    (message,) = translate(user(image_part(data_url(IMAGE), detail=detail))).messages
    assert message.parts[0].image == pb.MediaData(data=IMAGE, mime_type="image/png")


def test_text_only_parts_keep_joined_content() -> None:
    step = translate(
        user(text("a"), {"type": "refusal", "refusal": "b"}),
        {"role": "assistant", "content": [text("c")]},
    )
    assert [(m.content, len(m.parts)) for m in step.messages] == [("ab", 0), ("c", 0)]


@pytest.mark.parametrize(
    ("part", "param", "says"),
    [
        # URLs are never fetched
        (image_part("https://example.com/cat.png"), "image_url.url", "fetches nothing from URLs"),
        (image_part("http://10.0.0.1/x.png"), "image_url.url", "fetches nothing from URLs"),
        (image_part("file:///etc/passwd"), "image_url.url", "fetches nothing from URLs"),
        (image_part("iVBORw0KGgo="), "image_url.url", "send the image inline as a base64 data:"),
        (
            {"type": "image_url", "image_url": "https://example.com/cat.png"},
            "image_url",
            "fetches nothing from URLs",
        ),
        (
            {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}},
            "video_url.url",
            "data:video/mp4;base64,",
        ),
        # malformed data URLs
        (image_part("data:image/png,%89PNG"), "image_url.url", "must be a base64 data: URL"),
        (image_part("data:image/png;base64"), "image_url.url", "must be a base64 data: URL"),
        (image_part("data:image/png;base64,"), "image_url.url", "holds no image bytes"),
        (image_part("data:image/png;base64,iVBO@@=="), "image_url.url", "not valid base64"),
        (image_part("data:image/png;base64,iVBORw0"), "image_url.url", "not valid base64"),
        (image_part("data:image/png;base64,iVBO-_0K"), "image_url.url", "not valid base64"),
        (image_part("data:image/png;base64,ïVBORw0K"), "image_url.url", "not valid base64"),
        (image_part(data_url(VIDEO, "video/mp4")), "image_url.url", "must be image/..."),
        (
            {"type": "video_url", "video_url": {"url": data_url(IMAGE)}},
            "video_url.url",
            "must be video/...",
        ),
        # the part's shape
        ({"type": "image_url"}, "image_url", 'must be an object {"url": ...} or a URL string'),
        ({"type": "image_url", "image_url": 7}, "image_url", "or a URL string"),
        ({"type": "image_url", "image_url": {}}, "image_url.url", "is required"),
        ({"type": "image_url", "image_url": {"url": 7}}, "image_url.url", "must be a string"),
        # still refused
        (
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            "type",
            "not supported",
        ),
        (
            {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
            "type",
            "not supported",
        ),
        ({"type": "file", "file": {"file_data": "AAAA"}}, "type", "not supported"),
        ({"type": "image", "image": "AAAA"}, "type", "unknown content part type 'image'"),
    ],
)
def test_refusals_are_400_naming_the_body_path(part: dict, param: str, says: str) -> None:
    err = refusal({"role": "system", "content": "s"}, user(text("look: "), part))
    where = f"messages[1].content[1].{param}"
    assert (err.status, err.param) == (400, where)
    assert err.message.startswith(f"{where}: ") and says in err.message


@pytest.mark.parametrize("role", ["system", "developer", "assistant", "tool"])
@pytest.mark.parametrize("kind", ["image_url", "video_url"])
def test_media_only_in_user_messages(role: str, kind: str) -> None:
    part = {"type": kind, kind: {"url": data_url(IMAGE)}}
    err = refusal(user(text("hi")), {"role": role, "content": [text("x"), part]})
    assert (err.status, err.param) == (400, "messages[1].content[1].type")
    assert "only allowed in user messages" in err.message


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_server() -> ServerProcess:
    vl = demo_checkpoint(preset="demo-vl")
    with running_server(
        "--model", str(vl), "--served-model-name", VL_MODEL, "--http-port", "0"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(vl_server: ServerProcess) -> openai.OpenAI:
    with openai.OpenAI(base_url=vl_server.http_base, api_key="unused", max_retries=0) as client:
        yield client


def image_chat(url: str) -> list[dict]:
    return [user(text(QUESTION), image_part(url, detail="low"))]


def tokenize_image_chat(server: ServerProcess, image: bytes) -> pb.TokenizeResponse:
    """gRPC Tokenize of the chat image_chat() sends (instant mode, as NO_THINKING asks)."""
    parts = [pb.ContentPart(text=QUESTION), pb.ContentPart(image=pb.MediaData(data=image))]
    chat = pb.ChatInput(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, parts=parts)], mode=pb.MODE_INSTANT
    )
    with KimiClient(server.target) as client:
        return client.tokenize(pb.TokenizeRequest(chat=chat))


def post(server: ServerProcess, messages: list[dict]) -> httpx.Response:
    body = {"model": VL_MODEL, "messages": messages, "max_tokens": 4, **NO_THINKING}
    return httpx.post(f"{server.http_base}/chat/completions", json=body, timeout=120)


def test_image_chat_counts_the_tokens_tokenize_counts(
    vl_server: ServerProcess, oai: openai.OpenAI
) -> None:
    image = png()
    tokens = tokenize_image_chat(vl_server, image)
    assert [(m.message_index, m.part_index) for m in tokens.media] == [(0, 1)]
    assert tokens.media[0].num_tokens > 0
    reply = oai.chat.completions.create(
        model=VL_MODEL,
        messages=image_chat(data_url(image)),
        max_tokens=8,
        temperature=0,
        extra_body=NO_THINKING,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tokens.token_ids)
    assert reply.usage.completion_tokens > 0


def test_image_chat_streams(vl_server: ServerProcess, oai: openai.OpenAI) -> None:
    image = png(70, 28)
    expected = len(tokenize_image_chat(vl_server, image).token_ids)
    stream = oai.chat.completions.create(
        model=VL_MODEL,
        messages=image_chat(data_url(image)),
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_THINKING,
    )
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected


def test_image_url_over_https_is_400(vl_server: ServerProcess) -> None:
    response = post(vl_server, image_chat("https://example.com/cat.png"))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert error["message"].startswith(error["param"]) and "data:" in error["message"]


def test_corrupt_png_is_400_naming_the_part(vl_server: ServerProcess) -> None:
    corrupt = png()[:40] + b"\x00" * 64  # the signature and header, then garbage
    response = post(vl_server, image_chat(data_url(corrupt)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages[0].content[1]"
    assert error["message"].startswith("messages[0].content[1]: ")


def test_a_model_without_vision_refuses_images() -> None:
    with running_server("--http-port", "0") as srv:
        body = {"messages": image_chat(data_url(png())), "max_tokens": 4}
        response = httpx.post(f"{srv.http_base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]"
    assert error["message"].startswith(error["param"]) and "vision" in error["message"]
