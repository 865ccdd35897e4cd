"""Pure media helpers: frame sampling and timestamps (spec §4.5), the media text and the
expansion of ``<|media_pad|>`` (spec §5), content-hash composition."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from kimi_grpc.media import (
    IMAGE_PROMPT,
    MEDIA_PAD_ID,
    MediaConfig,
    MediaError,
    chunk_hash,
    expand_media_pads,
    item_hash,
    plan_sampling,
    sample_frame_indices,
    timestamp_str,
    video_chunk_prompt,
    video_prompt,
)


def exact_indices(num_frames: int, n: int) -> list[int]:
    """round(i * (N - 1) / (n - 1)) in exact arithmetic, half to even (Python's round)."""
    if n == 1:
        return [0]
    return [round(Fraction(i * (num_frames - 1), n - 1)) for i in range(n)]


@pytest.mark.parametrize(
    ("num_frames", "fps", "expected_n"),
    [
        (300, 30.0, 20),
        (10, 30.0, 1),  # round(0.67) = 1
        (7, 30.0, 1),  # round(0.47) = 0 -> at least 1
        (75, 30.0, 5),
        (105, 30.0, 7),
        (1, 30.0, 1),
        (7, 1.0, 7),  # fps below 2: every frame
        (9, 1.5, 9),
        (1800, 30.0, 120),
        (600, 60.0, 20),
        (45, 30.0, 3),  # round(3.0)
        (15 * 5 + 7, 30.0, 5),  # round(5.47)
        (300, 30000 / 1001, 20),
        (375, 25.0, 30),
    ],
)
def test_sample_frame_indices(num_frames, fps, expected_n):
    indices = sample_frame_indices(num_frames, fps, 2.0)
    assert len(indices) == expected_n
    assert indices == exact_indices(num_frames, expected_n)
    assert indices[0] == 0 and indices[-1] == (num_frames - 1 if expected_n > 1 else 0)


def test_sample_count_rounds_half_to_even():
    # 45 frames at 36 fps, 2 fps sampling: 45 * 2 / 36 = 2.5 -> 2 (half-away rounding gives 3)
    assert len(sample_frame_indices(45, 36.0, 2.0)) == 2
    # 63 frames: 3.5 -> 4
    assert len(sample_frame_indices(63, 36.0, 2.0)) == 4


def test_sample_frame_indices_cap_and_errors():
    assert sample_frame_indices(300, 30.0, 2.0, max_frames=4) == [0, 100, 199, 299]
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(0, 30.0)
    with pytest.raises(ValueError, match="avg_fps"):
        sample_frame_indices(10, 0.0)


@pytest.mark.parametrize(
    ("seconds", "mode", "text"),
    [
        (0.0, "hh:mm:ss.fff", "00:00:00.000"),
        (63 / 30, "hh:mm:ss.fff", "00:00:02.100"),
        (126 / 30, "hh:mm:ss.fff", "00:00:04.200"),
        (189 / 30, "hh:mm:ss.fff", "00:00:06.299"),  # 6.2999999999999998: truncated
        (252 / 30, "hh:mm:ss.fff", "00:00:08.400"),
        (3661.5, "hh:mm:ss.fff", "01:01:01.500"),
        (599.9999, "hh:mm:ss.fff", "00:09:59.999"),
        (3661.5, "mm:ss.fff", "01:01.500"),
        (75.25, "mm:ss", "01:15"),
    ],
)
def test_timestamp_str(seconds, mode, text):
    assert timestamp_str(seconds, mode) == text


def test_timestamp_mode_errors():
    with pytest.raises(ValueError, match="unknown timestamp mode"):
        timestamp_str(1.0, "ss")


def test_plan_sampling_chunks():
    plan = plan_sampling(300, 30.0, MediaConfig())
    assert [c.frame_indices[0] for c in plan.chunks] == [0, 63, 126, 189, 252]
    assert [c.timestamp for c in plan.chunks] == [
        "00:00:00.000",
        "00:00:02.100",
        "00:00:04.200",
        "00:00:06.299",
        "00:00:08.400",
    ]
    assert all(len(c.frame_indices) == 4 for c in plan.chunks)
    assert plan.last_index == 299 and plan.num_frames == 300
    two = plan_sampling(300, 30.0, MediaConfig(temporal_merge_kernel_size=3))
    assert [len(c.frame_indices) for c in two.chunks] == [3] * 6 + [2]
    capped = plan_sampling(300, 30.0, MediaConfig(max_num_frames_each_video=6))
    assert capped.indices == (0, 60, 120, 179, 239, 299)
    minutes = plan_sampling(300, 30.0, MediaConfig(timestamp_mode="mm:ss"))
    assert minutes.chunks[3].timestamp == "00:06"


# --- prompt -----------------------------------------------------------------------------------

VIDEO_CHUNK = "00:00:02.100<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"


def test_prompt_strings():
    assert IMAGE_PROMPT == "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
    assert video_chunk_prompt("00:00:02.100") == VIDEO_CHUNK
    assert video_prompt(["00:00:00.000", "00:00:02.100"]) == (
        "00:00:00.000<|media_begin|>video<|media_content|><|media_pad|><|media_end|>" + VIDEO_CHUNK
    )
    assert video_prompt([]) == ""


def test_expand_media_pads():
    p = MEDIA_PAD_ID
    ids = [1, 2, p, 3, p, p, 4]
    out = expand_media_pads(ids, [3, 1, 2])
    assert out.token_ids == [1, 2, p, p, p, 3, p, p, p, 4]
    assert out.spans == [(2, 3), (6, 1), (7, 2)]
    for offset, length in out.spans:
        assert out.token_ids[offset : offset + length] == [p] * length
    assert expand_media_pads([5, 6], []).token_ids == [5, 6]
    custom = expand_media_pads([9, 0, 9], [2], pad_id=0)
    assert custom.token_ids == [9, 0, 0, 9] and custom.spans == [(1, 2)]


@pytest.mark.parametrize(
    ("ids", "counts", "message"),
    [
        ([MEDIA_PAD_ID], [], "1 <|media_pad|> tokens for 0 images / video chunks"),
        ([1, 2], [5], "0 <|media_pad|> tokens for 1 images / video chunks"),
        ([MEDIA_PAD_ID, MEDIA_PAD_ID], [1], "2 <|media_pad|> tokens for 1"),
    ],
)
def test_expand_media_pads_mismatch(ids, counts, message):
    with pytest.raises(MediaError) as info:
        expand_media_pads(ids, counts)
    assert message in info.value.message


def test_expand_media_pads_rejects_empty_chunks():
    with pytest.raises(ValueError, match="at least one token"):
        expand_media_pads([MEDIA_PAD_ID], [0])


# --- hashing ----------------------------------------------------------------------------------


def test_chunk_hash_covers_pixels_grid_and_config():
    frames = torch.zeros((1, 28, 28, 3), dtype=torch.uint8)
    config = MediaConfig()
    base = chunk_hash(frames, (1, 2, 2), config)
    assert len(base) == 16 and base == chunk_hash(frames.clone(), (1, 2, 2), config)
    changed = frames.clone()
    changed[0, 27, 27, 2] = 1
    assert chunk_hash(changed, (1, 2, 2), config) != base
    assert chunk_hash(frames, (2, 1, 2), config) != base  # same bytes, other grid
    assert chunk_hash(frames, (1, 2, 2), MediaConfig(image_std=(0.25, 0.5, 0.5))) != base
    assert chunk_hash(frames, (1, 2, 2), MediaConfig(sample_fps=1.0)) == base
    assert item_hash([base]) != base and item_hash([base, base]) != item_hash([base])
    with pytest.raises(ValueError, match="uint8"):
        chunk_hash(frames.float(), (1, 2, 2), config)
