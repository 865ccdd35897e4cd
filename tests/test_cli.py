"""The installed ``kimi-grpc`` command: make-checkpoint demo, then generate from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_grpc.tokenizer import KimiTokenizer

CLI = Path(sys.executable).with_name("kimi-grpc")


def run(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, check=check, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = run("make-checkpoint", str(out), "--preset", "demo", "--seed", "3")
    assert "wrote demo checkpoint" in result.stdout
    return out


def generate(model: Path, *extra: str) -> dict:
    result = run("generate", "--model", str(model), "--max-tokens", "12", "--json", *extra)
    return json.loads(result.stdout)


def test_generate_greedy_is_deterministic(demo):
    first = generate(demo, "--prompt", "Hello Kimi, 你好 👋", "--temperature", "0")
    second = generate(demo, "--prompt", "Hello Kimi, 你好 👋", "--temperature", "0")
    assert first["token_ids"] == second["token_ids"]
    assert {"token_ids", "text", "finish_reason"} <= first.keys()
    assert first["finish_reason"] in ("stop", "length")
    n = len(first["token_ids"])
    assert n == 12 or (n <= 12 and first["finish_reason"] == "stop")
    tokenizer = KimiTokenizer.from_dir(demo)
    assert first["prompt_token_ids"] == tokenizer.encode("Hello Kimi, 你好 👋")
    assert first["text"] == tokenizer.decode(first["token_ids"], skip_special_tokens=True)


def test_prompt_ids_and_seeded_sampling(demo):
    args = (
        "--prompt-ids",
        "5,17,300,9",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--ignore-eos",
    )
    a, b = generate(demo, *args), generate(demo, *args)
    assert a["prompt_token_ids"] == [5, 17, 300, 9]
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12
    c = generate(demo, *args[:-3], "--seed", "8", "--ignore-eos")
    assert c["token_ids"] != a["token_ids"]


def test_reference_ops_give_the_same_greedy_tokens(demo):
    native = generate(demo, "--prompt-ids", "1,2,3", "--ops", "auto")
    reference = generate(demo, "--prompt-ids", "1,2,3", "--ops", "reference")
    assert native["token_ids"] == reference["token_ids"]


def test_default_model_is_the_built_in_demo(tmp_path):
    env = dict(os.environ, KIMI_GRPC_CACHE_DIR=str(tmp_path))
    result = run("generate", "--prompt", "hi", "--max-tokens", "3", "--json", env=env)
    out = json.loads(result.stdout)
    assert out["model"].startswith(str(tmp_path))
    assert (Path(out["model"]) / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "/nonexistent/ckpt", "--prompt", "x"), "neither an existing directory"),
        (("--prompt-ids", "1,99999"), "outside the vocabulary"),
        (("--prompt", "x", "--temperature", "-1"), "temperature"),
        (("--prompt", "x", "--max-tokens", "0"), "max_tokens"),
        (("--prompt", "x", "--top-p", "1.5"), "top_p"),
        (("--prompt", ""), "prompt is empty"),
    ],
)
def test_bad_input_fails_cleanly(demo, args, message):
    if "--model" not in args:
        args = ("--model", str(demo), *args)
    result = run("generate", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_preset(tmp_path):
    result = run("make-checkpoint", str(tmp_path / "x"), "--preset", "huge", check=False)
    assert result.returncode == 2 and "unknown preset 'huge'" in result.stderr


def test_serve_media_flags_map_to_media_limits():
    """Unset media flags keep MediaLimits' defaults, which the help text states; set ones land
    in the named field (MiB flags in bytes); a bad value is an error naming the field."""
    import re

    from kimi_grpc.cli import MEDIA_FLAGS, build_parser, media_limits
    from kimi_grpc.media import MediaLimits

    defaults = MediaLimits()
    parser = build_parser()
    assert media_limits(parser.parse_args(["serve"])) == defaults
    for flag, _, name, what in MEDIA_FLAGS:
        base, _, power = re.search(r"\(default ([0-9^]+)\)", what)[1].partition("^")
        value = int(base) ** int(power or 1)  # "8192^2" -> 8192**2
        if name.endswith("_bytes"):
            value *= 1 << 20
        assert getattr(defaults, name) == value, flag
    args = parser.parse_args(["serve", "--max-media-items", "3", "--max-video-mb", "1.5"])
    limits = media_limits(args)
    assert limits.max_items == 3 and limits.max_video_bytes == 3 << 19
    with pytest.raises(ValueError, match="max_video_seconds"):
        media_limits(parser.parse_args(["serve", "--max-video-seconds", "-1"]))
