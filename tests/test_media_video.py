"""Videos: PyAV streaming decode, Kimi's sampling / chunking / timestamps, limits, bad input.

Every video is encoded by the test with PyAV. Each frame carries its own number as a 12-bit
pattern of black / white 16x16 blocks, so the test can read back which source frames a chunk
holds, whatever the codec's losses.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
import zipfile
from fractions import Fraction
from typing import ClassVar

import av
import numpy as np
import pytest
import torch
from PIL import Image

from kimi_grpc.media import (
    MediaConfig,
    MediaError,
    MediaLimits,
    plan_video,
    preprocess_video,
    video_prompt,
)
from kimi_grpc.media.resize import video_chunk_resize_plan
from kimi_grpc.media.video import _video_stream

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only

W, H = 64, 48  # 4 x 3 blocks of 16 px: 12 bits of frame number

# 300 frames at 30 fps -> 20 sampled: round(i * 299 / 19), half to even, 5 chunks
INDICES_300 = [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268]
INDICES_300 += [283, 299]
STAMPS_300 = ["00:00:00.000", "00:00:02.100", "00:00:04.200", "00:00:06.299", "00:00:08.400"]

CODECS = [
    ("mp4", "libx264"),
    ("mov", "libx264"),
    ("mov", "mpeg4"),
    ("avi", "mpeg4"),
    ("avi", "mjpeg"),
    ("webm", "libvpx-vp9"),
    ("webm", "libvpx"),
    ("matroska", "libx265"),
    ("matroska", "libsvtav1"),
]


def frame_pattern(i: int, width: int = W, height: int = H) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    for bit in range(12):
        r, c = divmod(bit, 4)
        if (i >> bit) & 1:
            img[16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = 255
    return img


def read_pattern(rgb: np.ndarray) -> int:
    """The frame number in a (decoded, resized-to-identity) frame."""
    value = 0
    for bit in range(12):
        r, c = divmod(bit, 4)
        if rgb[16 * r + 4 : 16 * r + 12, 16 * c + 4 : 16 * c + 12].mean() > 128:
            value |= 1 << bit
    return value


def encode_video(
    fmt: str = "mp4",
    codec: str = "libx264",
    n: int = 300,
    fps: int | Fraction = 30,
    width: int = W,
    height: int = H,
    frame=frame_pattern,
    path=None,
    container_options: dict | None = None,
    pts=None,
) -> bytes:
    target = path if path is not None else io.BytesIO()
    with av.open(target, "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(frame(i), format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts(i), Fraction(1, 1000)
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if path is not None:
        return path.read_bytes()
    return target.getvalue()


def chunk_frame_numbers(chunk) -> list[int]:
    return [read_pattern(chunk.frames[f].numpy()) for f in range(chunk.grid_thw[0])]


# --- containers and codecs --------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "codec"), CODECS, ids=[f"{f}-{c}" for f, c in CODECS])
def test_containers_and_codecs(fmt, codec):
    data = encode_video(fmt, codec)
    video = preprocess_video(data)
    info = video.plan.info
    assert (info.width, info.height, info.num_frames, info.avg_fps) == (W, H, 300, 30.0)
    assert info.frames_from == ("packets" if fmt in ("webm", "matroska") else "header")
    assert list(video.plan.sampling.indices) == INDICES_300
    assert [c.timestamp for c in video.chunks] == STAMPS_300
    assert [c.frame_indices for c in video.chunks] == [
        tuple(INDICES_300[k : k + 4]) for k in range(0, 20, 4)
    ]
    # the kept frames are the right ones, read back from their pixels
    assert [n for c in video.chunks for n in chunk_frame_numbers(c)] == INDICES_300
    assert video.decoded_frames == 300  # stopped at frame 299, the last sampled
    for chunk in video.chunks:
        assert chunk.kind == "video" and chunk.grid_thw == (4, 4, 6) and chunk.num_tokens == 6
        assert chunk.frames.shape == (4, 56, 84, 3) and chunk.frames.dtype == torch.uint8
        assert not chunk.frames[:, 48:].any() and not chunk.frames[:, :, 64:].any()  # zero pad
        assert chunk.pixel_values().shape == (4 * 4 * 6, 3, 14, 14)
        assert chunk.source_size == (W, H)
    assert video.num_tokens == 30 == video.plan.num_tokens
    assert video.prompt == video_prompt(STAMPS_300)
    assert video.prompt.startswith(
        "00:00:00.000<|media_begin|>video<|media_content|><|media_pad|><|media_end|>00:00:02.100"
    )


def test_decoding_stops_after_the_last_sampled_frame():
    video = preprocess_video(encode_video(n=10))  # 1 sampled frame: index 0
    assert video.plan.sampling.indices == (0,)
    assert video.decoded_frames == 1
    assert len(video.chunks) == 1 and video.chunks[0].grid_thw == (1, 4, 6)
    assert chunk_frame_numbers(video.chunks[0]) == [0]


@pytest.mark.parametrize(
    ("n", "indices", "sizes", "stamps"),
    [
        (10, [0], [1], ["00:00:00.000"]),
        # 18.5 -> 18 and 55.5 -> 56: half to even; 74 / 30 s = 2.4666
        (75, [0, 18, 37, 56, 74], [4, 1], ["00:00:00.000", "00:00:02.466"]),
        # 69 / 30 = 2.2999999999999998 in binary: truncated to .299
        (105, [0, 17, 35, 52, 69, 87, 104], [4, 3], ["00:00:00.000", "00:00:02.299"]),
    ],
)
def test_tail_chunks(n, indices, sizes, stamps):
    video = preprocess_video(encode_video(n=n))
    assert list(video.plan.sampling.indices) == indices
    assert [c.grid_thw[0] for c in video.chunks] == sizes
    assert [n for c in video.chunks for n in chunk_frame_numbers(c)] == indices
    assert [c.num_tokens for c in video.chunks] == [6] * len(sizes)  # one frame's worth each
    assert [c.timestamp for c in video.chunks] == stamps
    assert video.decoded_frames == indices[-1] + 1


@pytest.mark.parametrize(
    ("fps", "n", "stamps"),
    [
        (1, 7, ["00:00:00.000", "00:00:04.000"]),
        (Fraction(3, 2), 9, ["00:00:00.000", "00:00:02.666", "00:00:05.333"]),
    ],
)
def test_low_frame_rate_keeps_every_frame(fps, n, stamps):
    video = preprocess_video(encode_video("avi", "mpeg4", n=n, fps=fps))
    assert video.plan.info.avg_fps == float(fps)
    assert list(video.plan.sampling.indices) == list(range(n))  # fps_s = avg_fps < 2
    assert [c.timestamp for c in video.chunks] == stamps
    assert [n for c in video.chunks for n in chunk_frame_numbers(c)] == list(range(n))


def test_ntsc_rate_timestamps():
    video = preprocess_video(encode_video(fps=Fraction(30000, 1001)))
    assert list(video.plan.sampling.indices) == INDICES_300  # round(300 * 2 / 29.97) = 20
    assert [c.timestamp for c in video.chunks] == [
        "00:00:00.000",
        "00:00:02.102",  # 63 / 29.97 = 2.1021
        "00:00:04.204",
        "00:00:06.306",
        "00:00:08.408",
    ]


def test_variable_frame_rate_is_sampled_by_frame_index():
    # 60 frames: 40 at 20 ms, then 20 at 200 ms (6.6 s in all)
    pts = lambda i: 20 * i if i < 40 else 800 + 200 * (i - 40)  # noqa: E731
    data = encode_video("mp4", "libx264", n=60, fps=30, pts=pts)
    with av.open(io.BytesIO(data)) as c:
        avg = float(c.streams.video[0].average_rate)
        times = [float(f.time) for f in c.decode(video=0)]
    gaps = {round(b - a, 3) for a, b in itertools.pairwise(times)}
    assert gaps == {0.02, 0.2}  # really variable
    video = preprocess_video(data)
    n = round(60 * 2 / avg)
    expected = [int(i) for i in np.round(np.linspace(0, 59, n))]
    assert list(video.plan.sampling.indices) == expected  # evenly in frames, not in time
    assert [n for c in video.chunks for n in chunk_frame_numbers(c)] == expected
    assert video.chunks[1].timestamp.startswith(f"00:00:0{int(expected[4] / avg)}.")


def test_frames_are_resized_with_the_first_frames_plan():
    """1280x720 frames: resized to 1202x676 (per-frame budget 4096), padded to 1204x700."""

    def frame(i: int) -> np.ndarray:
        yy, xx = np.mgrid[0:720, 0:1280]
        img = np.stack([(xx + 7 * i) % 256, (yy * 3) % 256, (xx ^ yy) % 256], -1)
        return img.astype(np.uint8)

    data = encode_video("mp4", "libx264", n=5, fps=2, width=1280, height=720, frame=frame)
    video = preprocess_video(data)
    assert [c.grid_thw for c in video.chunks] == [(4, 50, 86), (1, 50, 86)]
    assert [c.num_tokens for c in video.chunks] == [1075, 1075]
    plan = video_chunk_resize_plan(1280, 720, 4, MediaConfig())
    assert (plan.width, plan.height) == (1202, 676)
    # independent path: decode every frame with PyAV, Pillow bicubic, zero pad
    with av.open(io.BytesIO(data)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    expected = [
        np.pad(
            np.asarray(im.resize((1202, 676), Image.Resampling.BICUBIC)),
            ((0, 24), (0, 2), (0, 0)),
        )
        for im in decoded
    ]
    got = [c.frames[f].numpy() for c in video.chunks for f in range(c.grid_thw[0])]
    assert len(got) == 5
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(g, e)


def test_content_hash_per_chunk():
    data = encode_video(n=75)
    a, b = preprocess_video(data), preprocess_video(data)
    assert [c.content_hash for c in a.chunks] == [c.content_hash for c in b.chunks]
    assert a.content_hash == b.content_hash and len(a.content_hash) == 16
    assert a.chunks[0].content_hash != a.chunks[1].content_hash
    other = preprocess_video(encode_video(n=75, frame=lambda i: frame_pattern(i + 1)))
    assert other.chunks[0].content_hash != a.chunks[0].content_hash


def test_plan_video_reads_metadata_only():
    data = encode_video("webm", "libvpx-vp9", n=300)
    plan = plan_video(data)
    assert plan.info.num_frames == 300 and plan.info.seconds == 10.0
    assert plan.info.codec == "vp9" and plan.info.container == "mkv/webm"
    assert [c.timestamp for c in plan.sampling.chunks] == STAMPS_300
    assert plan.chunk_tokens == (6, 6, 6, 6, 6) and plan.num_tokens == 30


def test_cover_art_stream_is_skipped():
    """An attached picture (cover art) is a video stream too; the first real one is used."""

    class Stream:
        def __init__(self, disposition: int) -> None:
            self.disposition = av.stream.Disposition(disposition)

    class Container:
        class streams:
            video: ClassVar = [Stream(av.stream.Disposition.attached_pic), Stream(0), Stream(0)]

        class format:
            name = "mov,mp4,m4a,3gp,3g2,mj2"

    assert _video_stream(Container) is Container.streams.video[1]
    Container.streams.video = [Stream(av.stream.Disposition.attached_pic)]
    with pytest.raises(MediaError, match="the mp4/mov file has no video stream"):
        _video_stream(Container)


# --- limits and bad input ---------------------------------------------------------------------


def _zero_frame(fmt: str, codec: str) -> bytes:
    buf = io.BytesIO()
    out = av.open(buf, "w", format=fmt)
    stream = out.add_stream(codec, rate=30)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    out.start_encoding()
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("clip.mp4", encode_video(n=5))
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "PNG")
    return buf.getvalue()


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _rawvideo_avi() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        stream = out.add_stream("rawvideo", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "bgr24"
        for i in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pattern(i), "rgb24")):
                out.mux(packet)
    return buf.getvalue()


def _garbage_after_ftyp() -> bytes:
    data = encode_video(n=30)
    return data[:32] + np.random.default_rng(2).bytes(4000)


BAD_VIDEOS = [
    ("empty", lambda: b"", "empty", "the video is empty (0 bytes)"),
    ("random bytes", lambda: np.random.default_rng(3).bytes(20_000), "undecodable", "cannot open"),
    ("zip renamed .mp4", _zip, "undecodable", "not a readable mp4, mov, mkv, webm or avi file"),
    ("png sent as video", _png, "undecodable", "cannot open the video"),
    ("garbage after ftyp", _garbage_after_ftyp, "undecodable", "cannot open the video"),
    (
        "truncated mp4 (index at the end)",
        lambda: encode_video(n=300)[:3000],
        "undecodable",
        "cannot open the video",
    ),
    ("audio only", _audio_only, "empty", "the mp4/mov file has no video stream"),
    ("zero-frame mp4", lambda: _zero_frame("mp4", "libx264"), "empty", "no video stream"),
    ("zero-frame avi", lambda: _zero_frame("avi", "mpeg4"), "empty", "the avi video has no frames"),
    ("zero-frame mkv", lambda: _zero_frame("matroska", "libx264"), "undecodable", "cannot open"),
    ("rawvideo codec", _rawvideo_avi, "unsupported", "the avi video uses the rawvideo codec"),
    (
        "too long (601 s at 1 fps)",
        lambda: encode_video("avi", "mpeg4", n=601, fps=1, width=32, height=32),
        "too_large",
        "the video is 601.0 s long, over the limit of 600 s",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [pytest.param(make, reason, message, id=name) for name, make, reason, message in BAD_VIDEOS],
)
def test_bad_videos_are_media_errors(make, reason, message):
    data = make()
    start = time.perf_counter()
    with pytest.raises(MediaError) as info:
        preprocess_video(data)
    assert time.perf_counter() - start < 2.0
    assert info.value.reason == reason, info.value.message
    assert message in info.value.message


def test_truncated_mp4_with_index_first(tmp_path):
    """faststart: the index (300 frames) survives, the frames do not."""
    rng = np.random.default_rng(4)
    noise = lambda i: rng.integers(0, 256, (H, W, 3), dtype=np.uint8)  # noqa: E731
    data = encode_video(
        frame=noise, path=tmp_path / "v.mp4", container_options={"movflags": "faststart"}
    )
    assert preprocess_video(data).decoded_frames == 300
    with pytest.raises(
        MediaError, match=r"ends after \d+ frames but its header claims 300"
    ) as info:
        preprocess_video(data[: len(data) // 2])
    assert info.value.reason == "undecodable"


def test_a_missing_last_frame_repeats_the_previous_one(tmp_path):
    """A header one frame longer than the stream (the last frame's data cut short): the sampled
    frame 29 repeats frame 28, the last one decoded."""
    data = encode_video(
        "mp4",
        "mjpeg",
        n=30,
        path=tmp_path / "v.mp4",
        container_options={"movflags": "faststart"},
    )
    with av.open(io.BytesIO(data)) as c:
        packets = [p for p in c.demux(video=0) if p.size]
    assert len(packets) == 30
    video = preprocess_video(data[: packets[-1].pos + 10])
    assert video.plan.info.num_frames == 30 and video.decoded_frames == 29
    assert video.plan.sampling.indices == (0, 29)
    assert chunk_frame_numbers(video.chunks[0]) == [0, 28]
    assert video.chunks[0].frame_indices == (0, 29)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (MediaLimits(max_video_seconds=9.9), "the video is 10.0 s long, over the limit of 9.9 s"),
        (MediaLimits(max_video_frames=19), "samples to 20 frames (10.0 s at 2 fps), over the li"),
        (MediaLimits(max_decoded_frames=299), "300 frames, over the decoding limit of 299"),
        (MediaLimits(max_video_frame_pixels=64 * 48 - 1), "64x48 = 3072 pixels, over the limit"),
        (MediaLimits(max_video_bytes=1000), "bytes, over the limit of 1000"),
        (MediaLimits(max_media_tokens=29), "costs 30 tokens (5 chunks at 64x48), over the 29 m"),
    ],
)
def test_limits(limits, message):
    data = encode_video("webm", "libvpx-vp9")
    with pytest.raises(MediaError, match="over the") as info:
        preprocess_video(data, limits=limits)
    assert info.value.reason == "too_large"
    assert message in info.value.message
    relaxed = MediaLimits(
        max_video_seconds=10.0,
        max_video_frames=20,
        max_decoded_frames=300,
        max_video_frame_pixels=64 * 48,
        max_video_bytes=len(data),
        max_media_tokens=30,
    )
    assert preprocess_video(data, limits=relaxed).num_tokens == 30


def test_token_budget_argument():
    data = encode_video()
    with pytest.raises(MediaError, match="over the 29 media tokens left"):
        preprocess_video(data, max_tokens=29)
    assert preprocess_video(data, max_tokens=30).num_tokens == 30


def test_huge_frames_are_refused_before_decoding():
    """A real 8192x4320 H.264 stream (35 MP frames): refused from the stream header."""
    one = np.zeros((4320, 8192, 3), np.uint8)
    data = encode_video("mp4", "libx264", n=1, width=8192, height=4320, frame=lambda i: one)
    start = time.perf_counter()
    with pytest.raises(MediaError, match="8192x4320 = 35389440 pixels, over the limit of 8847360"):
        preprocess_video(data)
    assert time.perf_counter() - start < 1.0


def test_memory_stays_bounded():
    """10 s of 1280x720 (830 MiB if every frame were kept as RGB): the decode keeps 20."""
    psutil = pytest.importorskip("psutil")

    def frame(i: int) -> np.ndarray:
        img = np.zeros((720, 1280, 3), np.uint8)
        img[:, :, 0] = (np.arange(1280) + 4 * i) % 256
        img[(i * 7) % 600 : (i * 7) % 600 + 100, 100:300] = 255
        return img

    data = encode_video("mp4", "libx264", n=300, width=1280, height=720, frame=frame)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        video = preprocess_video(data, threads=2)
    finally:
        done.set()
        sampler.join()
    assert video.num_tokens == 5 * 1075 and video.decoded_frames == 300
    kept = sum(c.frames.numel() for c in video.chunks)
    assert kept == 20 * 700 * 1204 * 3  # 50 MB of uint8 frames
    assert peak[0] - base < 300 * 2**20, (peak[0] - base) / 2**20
