"""Media settings and Kimi's resize rule: the spec's token vectors exactly, transformers' own
``navit_resize`` on thousands of sizes, ``media_proc_cfg`` parsing and the server limits."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import random
from pathlib import Path

import pytest

from kimi_grpc.config import ConfigError
from kimi_grpc.media import MediaConfig, MediaError, MediaLimits, image_num_tokens, navit_resize
from kimi_grpc.media.resize import image_resize_plan, video_chunk_resize_plan

# K2.6's preprocessor_config.json media_proc_cfg, as shipped (spec §1.2).
K26_MEDIA_PROC_CFG = {
    "in_patch_limit": 16384,
    "patch_size": 14,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_kernel_size": 2,
    "fixed_output_tokens": None,
    "patch_limit_on_one_side": 512,
    "in_patch_limit_each_frame": 4096,
    "in_patch_limit_video": None,
    "sample_fps": 2.0,
    "max_num_frames_each_video": None,
    "temporal_merge_kernel_size": 4,
    "timestamp_mode": "hh:mm:ss.fff",
}

# spec §4.4: (W, H) -> resized (W', H') or None (not stated), grid (t, h, w), tokens
IMAGE_VECTORS = [
    ((2048, 1365), None, (1, 98, 148), 3626),
    ((17, 64), None, (1, 6, 2), 3),
    ((5000, 6000), (1637, 1964), (1, 142, 118), 4189),
    ((1920, 1080), None, (1, 78, 138), 2691),
    ((3840, 2160), (2392, 1345), (1, 98, 172), 4214),
    ((3000, 3000), (1794, 1794), (1, 130, 130), 4225),
    ((1024, 1024), None, (1, 74, 74), 1369),
    ((640, 480), None, (1, 36, 46), 414),
    ((448, 448), None, (1, 32, 32), 256),
    ((28, 28), None, (1, 2, 2), 1),
    ((1, 1), (1, 1), (1, 2, 2), 1),
    ((7168, 100), None, (1, 8, 512), 1024),
]

# spec §4.5: a video chunk's first frame (W, H) -> resized (W', H') or None, grid (h, w), tokens
FRAME_VECTORS = [
    ((1920, 1080), (1196, 672), (48, 86), 1032),
    ((1280, 720), (1202, 676), (50, 86), 1075),
    ((640, 480), (640, 480), (36, 46), 414),
    ((3000, 3000), None, None, 1089),
]


@pytest.mark.parametrize(("size", "resized", "grid", "tokens"), IMAGE_VECTORS)
def test_image_token_vectors(size, resized, grid, tokens):
    plan = image_resize_plan(*size, MediaConfig())
    if resized is not None:
        assert (plan.width, plan.height) == resized
    assert plan.grid_thw(1) == grid
    assert plan.num_tokens == tokens == image_num_tokens(*size)
    # padding: to the next multiple of 28, bottom / right only
    assert plan.padded_width % 28 == 0 and 0 <= plan.pad_width < 28
    assert plan.padded_height % 28 == 0 and 0 <= plan.pad_height < 28
    assert plan.grid_h * 14 == plan.padded_height and plan.grid_w * 14 == plan.padded_width


@pytest.mark.parametrize(("size", "resized", "grid", "tokens"), FRAME_VECTORS)
@pytest.mark.parametrize("t", [1, 3, 4])
def test_video_frame_token_vectors(size, resized, grid, tokens, t):
    plan = video_chunk_resize_plan(*size, t, MediaConfig())
    if resized is not None:
        assert (plan.width, plan.height) == resized
    if grid is not None:
        assert plan.grid_thw(t) == (t, *grid)
    assert plan.num_tokens == tokens  # one frame's worth, whatever the chunk's frame count


def test_extreme_aspect_is_clamped_to_512_patches_a_side():
    plan = navit_resize(100_000, 1)
    # 100000 * (7168 / 100000) truncates to 7167 in floating point; padding restores 7168
    assert (plan.width, plan.height, plan.pad_width, plan.pad_height) == (7167, 1, 1, 27)
    assert plan.grid_thw() == (1, 2, 512) and plan.num_tokens == 256
    plan = navit_resize(1, 100_000)
    assert plan.grid_thw() == (1, 512, 2) and plan.num_tokens == 256


def test_resize_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive"):
        navit_resize(0, 10)


def test_in_patch_limit_video_spreads_over_the_chunk_frames():
    config = MediaConfig(in_patch_limit_video=4096)
    # 4 frames: round(4096 / 4) = 1024 patches per frame (vs 4096 without the video budget)
    assert video_chunk_resize_plan(1920, 1080, 4, config) == navit_resize(
        1920, 1080, patch_limit=1024
    )
    assert video_chunk_resize_plan(1920, 1080, 1, config).num_tokens == 1032


def _transformers_navit_resize():
    """transformers' own ``navit_resize`` (kimi_k25 image processor), compiled from its source:
    the module itself needs torchvision, which is not installed."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("transformers is not installed")
    path = (
        Path(spec.submodule_search_locations[0])
        / "models"
        / "kimi_k25"
        / "image_processing_kimi_k25.py"
    )
    if not path.is_file():
        pytest.skip("this transformers has no kimi_k25 port")
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "navit_resize")
    namespace: dict = {"math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["navit_resize"]


def test_resize_equals_transformers_port_on_many_sizes():
    hf = _transformers_navit_resize()
    rng = random.Random(0)
    sizes = [(w, h) for w in (1, 2, 13, 14, 15, 27, 28, 29, 100, 513) for h in (1, 14, 28, 99)]
    sizes += [(rng.randint(1, 20_000), rng.randint(1, 20_000)) for _ in range(3000)]
    sizes += [(rng.randint(1, 300), rng.randint(1, 100_000)) for _ in range(500)]
    sizes += [w_h for w_h, *_ in IMAGE_VECTORS] + [w_h for w_h, *_ in FRAME_VECTORS]
    for limit in (16384, 4096):
        for w, h in sizes:
            ours = navit_resize(w, h, patch_limit=limit)
            (rh, rw), (ph, pw) = hf(h, w, 14, 2, limit, 512)
            assert (ours.height, ours.width) == (rh, rw), (w, h, limit)
            assert (ours.padded_height, ours.padded_width) == (ph, pw), (w, h, limit)
            assert ours.num_tokens == (ph // 28) * (pw // 28)
            assert ours.grid_h * ours.grid_w <= 512 * 512


# --- media_proc_cfg ---------------------------------------------------------------------------


def test_defaults_are_k26():
    assert MediaConfig() == MediaConfig.from_dict(K26_MEDIA_PROC_CFG)
    assert MediaConfig().frame_patch_limit == 4096


def test_from_model_dir(tmp_path):
    assert MediaConfig.from_model_dir(tmp_path) == MediaConfig()  # no file
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"auto_map": {"AutoProcessor": "x.Y"}}))
    assert MediaConfig.from_model_dir(tmp_path) == MediaConfig()  # no media_proc_cfg
    path.write_text(
        json.dumps({"media_proc_cfg": {"sample_fps": 1, "in_patch_limit_each_frame": None}})
    )
    config = MediaConfig.from_model_dir(tmp_path)
    assert config.sample_fps == 1.0 and isinstance(config.sample_fps, float)
    assert config.frame_patch_limit == 16384  # null: the image budget
    assert config.in_patch_limit == 16384  # absent fields keep K2.6's values
    path.write_text(json.dumps({"media_proc_cfg": K26_MEDIA_PROC_CFG}))
    assert MediaConfig.from_model_dir(tmp_path) == MediaConfig()


def test_unknown_fields_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="kimi_grpc.media.config"):
        config = MediaConfig.from_dict({**K26_MEDIA_PROC_CFG, "fixed_output_tokens_each_frame": 3})
    assert config == MediaConfig()
    assert "fixed_output_tokens_each_frame" in caplog.text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("in_patch_limit", 0, "positive integer"),
        ("in_patch_limit", 1.5, "positive integer"),
        ("patch_size", True, "positive integer"),
        ("patch_size", "14", "positive integer"),
        ("merge_kernel_size", -2, "positive integer"),
        ("in_patch_limit_each_frame", 0, "positive integer"),
        ("in_patch_limit_video", "big", "positive integer"),
        ("max_num_frames_each_video", 0, "positive integer"),
        ("temporal_merge_kernel_size", 0, "positive integer"),
        ("patch_limit_on_one_side", 511, "multiple of merge_kernel_size"),
        ("fixed_output_tokens", 64, "only null"),
        ("image_mean", [0.5, 0.5], "3 finite numbers"),
        ("image_std", [0.5, 0.0, 0.5], "positive"),
        ("image_std", "0.5", "3 finite numbers"),
        ("sample_fps", 0, "positive number"),
        ("sample_fps", float("nan"), "positive number"),
        ("sample_fps", None, "positive number"),
        ("timestamp_mode", "seconds", "must be one of"),
    ],
)
def test_bad_fields_name_the_field(tmp_path, field, value, message):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"media_proc_cfg": {**K26_MEDIA_PROC_CFG, field: value}})
    )
    with pytest.raises(ConfigError, match=f"media_proc_cfg.{field}: .*{message}"):
        MediaConfig.from_model_dir(tmp_path)


def test_unreadable_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json: cannot read"):
        MediaConfig.from_model_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"media_proc_cfg": [1]}))
    with pytest.raises(ConfigError, match="media_proc_cfg: must be an object"):
        MediaConfig.from_model_dir(tmp_path)


def test_fingerprint_changes_with_pixel_affecting_fields_only():
    base = MediaConfig().fingerprint()
    assert MediaConfig(sample_fps=1.0).fingerprint() == base  # sampling is not a pixel setting
    assert MediaConfig(image_mean=(0.4, 0.5, 0.5)).fingerprint() != base
    assert MediaConfig(patch_size=16, patch_limit_on_one_side=512).fingerprint() != base


# --- limits -----------------------------------------------------------------------------------


def test_limits_defaults_and_checks():
    limits = MediaLimits()
    assert limits.max_image_pixels == 8192 * 8192 < 89_478_485  # below Pillow's warning
    limits.check_items(100)
    with pytest.raises(MediaError, match="101 media items in one request, over the limit of 100"):
        limits.check_items(101)
    limits.check_tokens(131_072)
    with pytest.raises(MediaError, match="131073 tokens, over the limit of 131072") as info:
        limits.check_tokens(131_073)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_items", 0),
        ("max_image_bytes", 1.5),
        ("max_video_frames", True),
        ("max_video_seconds", 0),
        ("max_video_seconds", math.inf),
    ],
)
def test_limits_validate(field, value):
    with pytest.raises(ValueError, match=field):
        MediaLimits(**{field: value})
