"""Kimi's video frame sampling, chunking and timestamps (spec §4.5): pure functions of the frame
count and the average frame rate, as Moonshot's ``navit_resize_video`` / ``split_video_chunks`` /
``timestamp_as_str`` compute them.

    fps_s = min(sample_fps, avg_fps)
    n     = max(round(num_frames * fps_s / avg_fps), 1)      Python round: half to even
    n     = min(n, max_num_frames_each_video)                 when the checkpoint sets it
    idx   = numpy.round(linspace(0, num_frames - 1, n))       half to even
    chunks: consecutive groups of temporal_merge_kernel_size (4) sampled frames, the last 1..4
    chunk start = idx[4k] / avg_fps seconds, "HH:MM:SS" + "." + int((t % 1) * 1000) (truncated)

Sampling is by frame index, as the reference's: a variable-frame-rate video is sampled evenly in
frames, not in time, and its timestamps are ``index / average fps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from kimi_grpc.media.config import MediaConfig


def sample_frame_indices(
    num_frames: int,
    avg_fps: float,
    sample_fps: float = 2.0,
    max_frames: int | None = None,
) -> list[int]:
    """Source frame numbers to keep, non-decreasing, in ``[0, num_frames)``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if not avg_fps > 0:
        raise ValueError(f"avg_fps must be positive, got {avg_fps}")
    fps = min(sample_fps, avg_fps)
    n = max(round(num_frames * fps / avg_fps), 1)
    if max_frames is not None:
        n = min(n, max_frames)
    return [int(i) for i in np.round(np.linspace(0, num_frames - 1, n)).astype(np.int64)]


def timestamp_str(seconds: float, mode: str = "hh:mm:ss.fff") -> str:
    """Moonshot's ``timestamp_as_str``: UTC ``strftime`` of the whole seconds, milliseconds
    truncated (``189 / 30`` s -> ``00:00:06.299``)."""
    clock = datetime.fromtimestamp(seconds, tz=UTC)
    millis = f".{int((seconds % 1) * 1000):03d}"
    if mode == "hh:mm:ss.fff":
        return clock.strftime("%H:%M:%S") + millis
    if mode == "mm:ss.fff":
        return clock.strftime("%M:%S") + millis
    if mode == "mm:ss":
        return clock.strftime("%M:%S")
    raise ValueError(f"unknown timestamp mode {mode!r}")


@dataclass(frozen=True)
class ChunkPlan:
    """One video chunk: which sampled frames, and the timestamp of its first."""

    index: int  # chunk number within the video
    frame_indices: tuple[int, ...]  # 1..temporal_merge_kernel_size source frame numbers
    timestamp: str


@dataclass(frozen=True)
class SamplingPlan:
    """A video's frames to keep and how they group into chunks."""

    num_frames: int  # frames in the video (the count the indices were computed from)
    avg_fps: float
    indices: tuple[int, ...]  # all sampled source frame numbers, in order
    chunks: tuple[ChunkPlan, ...]

    @property
    def last_index(self) -> int:
        return self.indices[-1]


def plan_sampling(num_frames: int, avg_fps: float, config: MediaConfig) -> SamplingPlan:
    """Samples and chunks a video of ``num_frames`` frames at ``avg_fps`` under ``config``."""
    indices = sample_frame_indices(
        num_frames, avg_fps, config.sample_fps, config.max_num_frames_each_video
    )
    size = config.temporal_merge_kernel_size
    chunks = tuple(
        ChunkPlan(
            index=k,
            frame_indices=tuple(indices[start : start + size]),
            timestamp=timestamp_str(indices[start] / avg_fps, config.timestamp_mode),
        )
        for k, start in enumerate(range(0, len(indices), size))
    )
    return SamplingPlan(num_frames, float(avg_fps), tuple(indices), chunks)
