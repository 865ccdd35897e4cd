"""Kimi's resize rule (``navit_resize_image``, spec §4.2): pure integer/float math, no pixels.

Given an image (or a video chunk's first frame) of ``width x height`` pixels and a patch budget:

    s1 = sqrt(limit / (max(1, W // p) * max(1, H // p)))     total-patch budget
    s2 = S * p / W,  s3 = S * p / H                          per-side budget (S patches)
    scale = min(1, s1, s2, s3)                               never upscales
    W' = min(max(1, int(W * scale)), S * p)                  int() truncates
    H' = min(max(1, int(H * scale)), S * p)
    pad_w = (m*p - W' mod m*p) mod m*p, pad_h likewise       zero pad to a multiple of 28
    grid = (t, (H' + pad_h) / p, (W' + pad_w) / p)
    tokens = ((H' + pad_h) / (m*p)) * ((W' + pad_w) / (m*p)) one per 2x2 patches, any t

The expressions (float division, ``max(1.0, ...)``, truncation) follow Moonshot's
``media_utils.navit_resize_image`` operation for operation, so the sizes are bit-for-bit theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kimi_grpc.media.config import MediaConfig


@dataclass(frozen=True)
class ResizePlan:
    """Where one image / video chunk goes: resize to ``width x height`` (Pillow bicubic), then
    zero-pad ``pad_width`` columns on the right and ``pad_height`` rows at the bottom."""

    width: int  # W' (resized, before padding)
    height: int  # H'
    pad_width: int
    pad_height: int
    grid_h: int  # patches down: (H' + pad_h) / p
    grid_w: int  # patches across: (W' + pad_w) / p
    num_tokens: int  # (grid_h / m) * (grid_w / m), independent of the frame count

    @property
    def padded_width(self) -> int:
        return self.width + self.pad_width

    @property
    def padded_height(self) -> int:
        return self.height + self.pad_height

    def grid_thw(self, t: int = 1) -> tuple[int, int, int]:
        return (t, self.grid_h, self.grid_w)


def navit_resize(
    width: int,
    height: int,
    *,
    patch_size: int = 14,
    merge_kernel_size: int = 2,
    patch_limit: int = 16384,
    patch_limit_on_one_side: int = 512,
) -> ResizePlan:
    """The resize rule for a ``width x height`` source (both >= 1) under ``patch_limit``
    patches (16384 for an image, 4096 per video frame for K2.6)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    p, side = patch_size, patch_limit_on_one_side
    s1 = math.sqrt(patch_limit / (max(1.0, width // p) * max(1.0, height // p)))
    s2 = side * p / width
    s3 = side * p / height
    scale = min(1.0, s1, s2, s3)
    new_w = min(max(1, int(width * scale)), side * p)
    new_h = min(max(1, int(height * scale)), side * p)
    factor = merge_kernel_size * p
    pad_w = (factor - new_w % factor) % factor
    pad_h = (factor - new_h % factor) % factor
    grid_h, grid_w = (new_h + pad_h) // p, (new_w + pad_w) // p
    tokens = ((new_h + pad_h) // factor) * ((new_w + pad_w) // factor)
    return ResizePlan(new_w, new_h, pad_w, pad_h, grid_h, grid_w, tokens)


def image_resize_plan(width: int, height: int, config: MediaConfig) -> ResizePlan:
    """An image's plan under ``config`` (budget ``in_patch_limit``)."""
    return navit_resize(
        width,
        height,
        patch_size=config.patch_size,
        merge_kernel_size=config.merge_kernel_size,
        patch_limit=config.in_patch_limit,
        patch_limit_on_one_side=config.patch_limit_on_one_side,
    )


def video_chunk_resize_plan(
    width: int, height: int, num_frames: int, config: MediaConfig
) -> ResizePlan:
    """A video chunk's plan from its first frame's size: budget ``in_patch_limit_each_frame``,
    lowered to ``round(in_patch_limit_video / num_frames)`` when the checkpoint sets a per-chunk
    video budget (Moonshot's ``navit_resize_video`` called per chunk; null for K2.6)."""
    limit = config.frame_patch_limit
    if config.in_patch_limit_video is not None:
        limit = min(round(config.in_patch_limit_video / num_frames), limit)
    return navit_resize(
        width,
        height,
        patch_size=config.patch_size,
        merge_kernel_size=config.merge_kernel_size,
        patch_limit=limit,
        patch_limit_on_one_side=config.patch_limit_on_one_side,
    )
