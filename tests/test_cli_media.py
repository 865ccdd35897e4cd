"""Images and video on the command line: ``generate --chat --image/--video`` offline (demo-vl)
and ``chat --image`` / ``/image`` / ``/video`` against a real server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_media_video import encode_video

from kimi_grpc import LLM, SamplingParams
from kimi_grpc.chat import ChatRenderer
from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.cli import build_parser, main
from kimi_grpc.media import MediaConfig, MediaLimits
from kimi_grpc.media.request import ChatPrompt, chat_prompt
from tests.server_harness import ServerProcess, running_server

QUESTION = "What do you see?"
MAX_TOKENS = 4


def png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two PNGs of different token counts, and a 2 s H.264 clip."""
    root = tmp_path_factory.mktemp("media")
    blocks = np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = blocks.repeat(16, axis=0).repeat(16, axis=1)
    contents = {
        "a.png": png(1, (160, 120)),
        "b.png": png(2, (64, 48)),
        "clip.mp4": encode_video(
            n=8, fps=4, width=128, height=96, frame=lambda i: np.roll(base, 8 * i, 1)
        ),
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in contents}


@pytest.fixture(scope="module")
def vl_path() -> Path:
    return demo_checkpoint(preset="demo-vl")


@pytest.fixture(scope="module")
def reference(vl_path: Path):
    """The demo-vl model in this process, with the renderer the CLI builds."""
    with LLM(str(vl_path), dtype="float32") as llm:
        vision = llm.engine.model.config.vision_config
        renderer = ChatRenderer.from_model_dir(
            vl_path, llm.tokenizer, video_placeholder=vision.video_placeholder
        )
        yield llm, renderer, MediaConfig.from_model_dir(vl_path), vision.media_placeholder_token_id


def expected_prompt(reference, files: dict[str, Path], *media: tuple[str, str]) -> ChatPrompt:
    _, renderer, config, pad_id = reference
    parts = [{"type": kind, "data": files[name].read_bytes()} for kind, name in media]
    message = {"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}
    return chat_prompt(renderer, [message], config, MediaLimits(), pad_id=pad_id, thinking=True)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_media_flags_keep_their_command_line_order() -> None:
    order = [("video", "v.mp4"), ("image", "a.png"), ("video", "w.mp4"), ("image", "b.png")]
    flags = [arg for kind, path in order for arg in (f"--{kind}", path)]
    args = build_parser().parse_args(["generate", "--chat", "--prompt", "x", *flags])
    assert args.media == order
    chat = build_parser().parse_args(["chat", "--image", "a.png", "--video", "v.mp4"])
    assert chat.media == [("image", "a.png"), ("video", "v.mp4")]


def test_generate_chat_matches_chat_prompt_and_the_engine(
    capsys, reference, vl_path: Path, files: dict[str, Path]
) -> None:
    """Mixed flags: image, video, image -> exactly that order in the prompt; the tokens are the
    engine's greedy tokens for chat_prompt's spans."""
    order = (("image", "a.png"), ("video", "clip.mp4"), ("image", "b.png"))
    flags = [arg for kind, name in order for arg in (f"--{kind}", str(files[name]))]
    code, out, err = run_main(
        capsys, "generate", "--model", str(vl_path), "--chat", "--prompt", QUESTION, *flags,
        "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--ignore-eos", "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    expected = expected_prompt(reference, files, *order)
    kinds = [span.chunk.kind for span in expected.spans]
    assert kinds == ["image"] + ["video"] * (len(kinds) - 2) + ["image"] and len(kinds) > 2
    assert record["prompt_token_ids"] == expected.token_ids
    grouped = expected_prompt(reference, files, order[0], order[2], order[1])
    assert grouped.token_ids != expected.token_ids  # the order is visible in the prompt
    llm = reference[0]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = llm.generate(expected.token_ids, params, media=expected.spans)[0]
    assert record["token_ids"] == want.token_ids and len(want.token_ids) == MAX_TOKENS


def test_generate_chat_instant_mode_renders_an_empty_think(
    capsys, reference, vl_path: Path
) -> None:
    code, out, err = run_main(
        capsys, "generate", "--model", str(vl_path), "--chat", "--prompt", QUESTION,
        "--mode", "instant", "--max-tokens", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    llm, renderer = reference[0], reference[1]
    message = {"role": "user", "content": [{"type": "text", "text": QUESTION}]}
    instant = renderer.render([message], thinking=False)
    assert json.loads(out)["prompt_token_ids"] == instant.token_ids
    assert llm.tokenizer.decode(instant.token_ids).endswith("<think></think>")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--chat", "--image", "{missing}"], "--image {missing}: No such file or directory"),
        (["--image", "{a}"], "--image, --video and --mode need --chat"),
        (["--mode", "instant"], "--image, --video and --mode need --chat"),
        (["--chat", "--target", "localhost:1"], "--chat runs offline (--model); with a server"),
    ],
    ids=["missing-file", "image-without-chat", "mode-without-chat", "chat-with-target"],
)
def test_generate_refusals_before_loading(
    capsys, files: dict[str, Path], argv: list[str], message: str
) -> None:
    names = {"missing": str(files["a.png"].with_name("missing.png")), "a": str(files["a.png"])}
    argv = [arg.format(**names) for arg in argv]
    code, out, err = run_main(capsys, "generate", "--prompt", QUESTION, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"kimi-grpc generate: error: {message.format(**names)}"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("model", "flag", "name", "reason"),
    [
        ("demo", "--image", "a.png", "this model has no vision tower; it takes text only"),
        ("demo-vl", "--video", "a.png", "cannot open the video"),
    ],
    ids=["text-only-model", "image-as-video"],
)
def test_generate_media_refusals_name_the_flag_and_file(
    capsys, files: dict[str, Path], model: str, flag: str, name: str, reason: str
) -> None:
    path = str(demo_checkpoint(preset=model))
    code, out, err = run_main(
        capsys, "generate", "--model", path, "--chat", "--prompt", QUESTION,
        flag, str(files[name]), "--max-tokens", "1",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith(f"kimi-grpc generate: error: {flag} {files[name]}: {reason}"), err
    assert err.count("\n") == 1


# ---- chat against a server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_server(vl_path: Path) -> ServerProcess:
    # One media item per request: a history that resends the first turn's image makes a second
    # attachment go over the limit, which shows what the REPL sends.
    with running_server("--model", str(vl_path), "--max-media-items", "1") as srv:
        yield srv


def chat(server: ServerProcess, *flags: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kimi_grpc.cli", "chat", "--target", server.target, *flags,
         "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--mode", "instant"],
        input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_chat_sends_images_and_videos(vl_server: ServerProcess, files: dict[str, Path]) -> None:
    missing = files["a.png"].with_name("missing.png")
    lines = [
        "describe it",  # with --image a.png: one item
        f"/video {files['clip.mp4']}",
        "and this?",  # the history's image + the video: over --max-media-items 1, dropped
        f"/image {missing}",
        "/reset",
        f"/video {files['clip.mp4']}",
        "what happens?",  # the video alone
        "/image",
        "/exit",
    ]
    out = chat(vl_server, "--image", str(files["a.png"]), stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    err = out.stderr
    size = files["clip.mp4"].stat().st_size / 1024
    assert err.count(f"attached video {files['clip.mp4']} ({size:.1f} KiB)") == 2
    assert "INVALID_ARGUMENT: messages[2].parts[0]" in err and "over the limit of 1" in err
    assert f"kimi-grpc chat: /image {missing}: No such file or directory" in err
    assert "usage: /image PATH" in err
    replies = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2  # the first and the third turn streamed a reply


def test_chat_refuses_a_missing_file_at_start(capsys, files: dict[str, Path]) -> None:
    missing = files["a.png"].with_name("missing.mp4")
    code, _, err = run_main(capsys, "chat", "--target", "localhost:1", "--video", str(missing))
    assert code == 2
    assert err == f"kimi-grpc chat: error: --video {missing}: No such file or directory\n"
