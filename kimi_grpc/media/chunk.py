"""One encoder input (a :class:`VisionChunk`: an image, or up to 4 sampled frames of a video) and
its pixel values in the vision tower's layout.

A chunk keeps its pixels as resized, zero-padded **uint8** RGB frames ``[t, H, W, 3]`` and
produces the float patches on demand (:meth:`VisionChunk.pixel_values`). Float32 patches cost 4
bytes per value: a 60-second 1080p video (30 chunks of 4 frames at 1204x672) is 0.29 GiB as uint8
but 1.17 GiB as float32, so holding floats for a whole request would blow the memory bound; the
encoder asks for one batch of chunks at a time instead.

Layout (spec §3, Moonshot's ``navit_patchify``): patches are frame-major, then row-major over the
(row, col) patch grid, each patch channel-first ``(c, y, x)``; values are
``(u / 255 - mean) * (1 / std)`` with ``u / 255`` computed in float64 and rounded to float32, then
float32 arithmetic, exactly as Moonshot's ``normalize`` (for K2.6's mean = std = 0.5 this is
``2u/255 - 1``; padding pixels become -1.0).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kimi_grpc.media.config import MediaConfig

MediaKind = Literal["image", "video"]


@dataclass(frozen=True, eq=False)
class VisionChunk:
    """One image or one video chunk, preprocessed (resized, padded; not yet normalised)."""

    kind: MediaKind
    frames: torch.Tensor  # uint8 [t, H, W, 3] RGB, H = p * grid_h, W = p * grid_w (padded)
    grid_thw: tuple[int, int, int]  # (t, H / p, W / p) in patches
    num_tokens: int  # <|media_pad|> count: (H / 2p) * (W / 2p), independent of t
    content_hash: bytes  # 16 bytes (kimi_grpc.media.hashing.chunk_hash)
    config: MediaConfig  # normalisation and patch size used by pixel_values()
    timestamp: str | None = None  # video: start of the chunk's first frame ("00:00:06.299")
    frame_indices: tuple[int, ...] = ()  # video: source frame numbers of the t frames
    source_size: tuple[int, int] = (0, 0)  # (width, height) of the (first) source frame

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def pixel_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised patches, float ``[t * h * w, 3, p, p]`` (computed in float32, then cast:
        the tower casts to its own dtype the same way)."""
        return patchify(normalize(self.frames, self.config), self.config.patch_size).to(dtype)


def normalize(frames: torch.Tensor, config: MediaConfig) -> torch.Tensor:
    """uint8 ``[..., 3]`` -> float32 ``[..., 3]`` through the per-channel table."""
    table = _normalization_table(config.image_mean, config.image_std)  # float32 [3 * 256]
    offsets = torch.tensor([0, 256, 512], dtype=torch.int32)
    index = frames.to(torch.int32) + offsets  # [..., 3] into the flat table
    return table.index_select(0, index.reshape(-1)).reshape(frames.shape)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[t, H, W, C]`` -> ``[t * (H/p) * (W/p), C, p, p]`` (frame, row, col; channel-first)."""
    t, height, width, channels = pixels.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"frames {height}x{width} are not a multiple of the patch size {p}")
    x = pixels.reshape(t, height // p, p, width // p, p, channels)
    x = x.permute(0, 1, 3, 5, 2, 4)  # [t, H/p, W/p, C, p(y), p(x)]
    return x.reshape(-1, channels, p, p)


def pack_pixel_values(
    chunks: Sequence[VisionChunk], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's batch input: pixel values ``[sum(t*h*w), 3, p, p]`` concatenated in chunk
    order, and ``grid_thws`` int64 ``[len(chunks), 3]``."""
    if not chunks:
        raise ValueError("no chunks to pack")
    pixel_values = torch.cat([chunk.pixel_values(dtype) for chunk in chunks])
    grid_thws = torch.tensor([chunk.grid_thw for chunk in chunks], dtype=torch.int64)
    return pixel_values, grid_thws


@functools.lru_cache(maxsize=8)
def _normalization_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """float32 [3 * 256]: entry ``256 c + u`` is channel c's value for byte u, computed as
    Moonshot's ``normalize`` does (float64 ``u / 255`` -> float32, minus float32 mean, times
    float32 ``1 / std``)."""
    u = np.arange(256, dtype=np.uint8)
    mean32 = np.asarray(mean, dtype=np.float32)
    std_inv32 = 1.0 / np.asarray(std, dtype=np.float32)
    rows = []
    for c in range(3):
        value = (u / 255.0).astype(np.float32)
        value -= mean32[c]
        value *= std_inv32[c]
        rows.append(value)
    return torch.from_numpy(np.concatenate(rows))
