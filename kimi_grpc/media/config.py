"""Media settings: the checkpoint's preprocessing rule (:class:`MediaConfig`) and the server's
safety limits (:class:`MediaLimits`).

:class:`MediaConfig` is ``media_proc_cfg`` from the checkpoint's ``preprocessor_config.json``
(Moonshot's layout, spec §1.2); a missing file or field takes Kimi K2.6's value. The file is data
only (its ``auto_map`` remote code is never imported). A value we cannot honour raises
:class:`~kimi_grpc.config.ConfigError` naming the field.

:class:`MediaLimits` is what one request may cost the server; the reference processor has no caps
at all (spec §4.5: "a server-side cap is mandatory"). Defaults and their reasons are on the fields.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kimi_grpc.config import ConfigError
from kimi_grpc.media.errors import TOO_LARGE, MediaError

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
TIMESTAMP_MODES = ("hh:mm:ss.fff", "mm:ss.fff", "mm:ss")
MiB = 1 << 20


@dataclass(frozen=True)
class MediaConfig:
    """``media_proc_cfg`` (field names as in the file; defaults = Kimi K2.6)."""

    in_patch_limit: int = 16384  # patches per image (before 2x2 merge: ~4096 tokens)
    patch_size: int = 14
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    merge_kernel_size: int = 2  # spatial merge: tokens = patches / merge^2
    fixed_output_tokens: int | None = None  # must stay null (the encoder's count is the grid's)
    patch_limit_on_one_side: int = 512  # patches along one side (RoPE table bound)
    in_patch_limit_each_frame: int | None = 4096  # per video frame; null: in_patch_limit
    in_patch_limit_video: int | None = None  # per video chunk, spread over its frames
    sample_fps: float = 2.0
    max_num_frames_each_video: int | None = None  # sampled frames per video (null: no cap)
    temporal_merge_kernel_size: int = 4  # sampled frames per video chunk
    timestamp_mode: str = "hh:mm:ss.fff"

    def __post_init__(self) -> None:
        for name in ("in_patch_limit", "patch_size", "merge_kernel_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("patch_limit_on_one_side", self.patch_limit_on_one_side)
        _positive_int("temporal_merge_kernel_size", self.temporal_merge_kernel_size)
        for name in ("in_patch_limit_each_frame", "in_patch_limit_video"):
            _optional_positive_int(name, getattr(self, name))
        _optional_positive_int("max_num_frames_each_video", self.max_num_frames_each_video)
        if self.fixed_output_tokens is not None:
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg.fixed_output_tokens: only null is "
                f"supported (the vision tower emits one token per 2x2 patches), got "
                f"{self.fixed_output_tokens!r}"
            )
        if self.patch_limit_on_one_side % self.merge_kernel_size:
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg.patch_limit_on_one_side: must be a "
                f"multiple of merge_kernel_size ({self.merge_kernel_size}), got "
                f"{self.patch_limit_on_one_side}"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            ok = (
                isinstance(value, tuple)
                and len(value) == 3
                and all(_is_number(v) and math.isfinite(v) for v in value)
            )
            if not ok:
                raise ConfigError(
                    f"{PREPROCESSOR_CONFIG}: media_proc_cfg.{name}: must be a list of 3 finite "
                    f"numbers (R, G, B), got {value!r}"
                )
        if any(v <= 0 for v in self.image_std):
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg.image_std: must be positive, got "
                f"{self.image_std!r}"
            )
        if not (_is_number(self.sample_fps) and math.isfinite(self.sample_fps)) or (
            self.sample_fps <= 0
        ):
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg.sample_fps: must be a positive number, "
                f"got {self.sample_fps!r}"
            )
        if self.timestamp_mode not in TIMESTAMP_MODES:
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg.timestamp_mode: must be one of "
                f"{', '.join(TIMESTAMP_MODES)}, got {self.timestamp_mode!r}"
            )

    @property
    def frame_patch_limit(self) -> int:
        """Patch budget of one video frame (``in_patch_limit_each_frame``, else the image's)."""
        if self.in_patch_limit_each_frame is None:
            return self.in_patch_limit
        return self.in_patch_limit_each_frame

    def fingerprint(self) -> bytes:
        """The fields that change pixel values or grids, as canonical bytes (hash keys)."""
        used = {
            "patch_size": self.patch_size,
            "merge_kernel_size": self.merge_kernel_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        return json.dumps(used, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MediaConfig:
        """From a ``media_proc_cfg`` mapping; absent keys take the defaults, unknown keys are
        logged and ignored (Moonshot may add fields; none we know of changes K2.x media)."""
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{PREPROCESSOR_CONFIG}: media_proc_cfg: must be an object, got "
                f"{type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"config_type"})  # config_type: a class tag
        if unknown:
            logger.warning(
                "%s: media_proc_cfg fields ignored: %s", PREPROCESSOR_CONFIG, ", ".join(unknown)
            )
        values: dict[str, Any] = {}
        for key in known & set(raw):
            value = raw[key]
            if key in ("image_mean", "image_std") and isinstance(value, list):
                value = tuple(value)
            if key == "sample_fps" and _is_number(value):
                value = float(value)
            values[key] = value
        return cls(**values)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> MediaConfig:
        """Reads ``<model_dir>/preprocessor_config.json``; K2.6 defaults when it is absent or has
        no ``media_proc_cfg``."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a JSON object")
        if "media_proc_cfg" not in raw:
            return cls()
        return cls.from_dict(raw["media_proc_cfg"])


@dataclass(frozen=True)
class MediaLimits:
    """What one request's media may cost. Every limit is checked before the work it bounds
    (bytes before parsing, header dimensions before decoding pixels, the container's duration
    and frame count before decoding frames, the token count before the encoder)."""

    # Encoded bytes of one image. 20 MiB: OpenAI's per-image limit; a 48 MP phone JPEG is ~15 MB.
    max_image_bytes: int = 20 * MiB
    # Encoded bytes of one video. 256 MiB: 10 min of 1080p H.264 at ~3.5 Mbit/s (a typical
    # phone/screen recording); the gRPC message limit must admit it too.
    max_video_bytes: int = 256 * MiB
    # Images + videos per request. 100: Anthropic's per-request image count; an agent that keeps
    # every screenshot of a long session in its history stays under it, and the token limit below
    # is what really bounds the cost.
    max_items: int = 100
    # Decoded pixels of one image, checked from the header before any pixel is decoded (the
    # decompression-bomb guard). 8192 x 8192 = 67.1 MP: admits 48 MP phone photos and 8K
    # renders, costs <= 192 MiB of RGB while decoding, and stays below Pillow's own warning
    # threshold (89.5 MP), so Pillow never warns on an image we accept. Pillow itself refuses
    # headers over 2 x Image.MAX_IMAGE_PIXELS (179 MP), whatever this says.
    max_image_pixels: int = 8192 * 8192
    # Pixels of one video frame (claimed by the stream header, checked before decoding, and
    # re-checked on every decoded frame). 4096 x 2160 (DCI 4K; UHD 3840 x 2160 fits): decoders
    # keep up to ~16 reference frames, so 8K would cost ~1 GiB before a frame is converted.
    max_video_frame_pixels: int = 4096 * 2160
    # Duration of one video (frames / average fps, and the container's duration). 10 minutes:
    # more than fits in K2.6's 256K context at 1080p (~8 min at 2 fps, 1032 tokens per 2 s).
    max_video_seconds: float = 600.0
    # Frames sampled from one video (the encoder's input). 1200 = 10 minutes at 2 fps.
    max_video_frames: int = 1200
    # Frames decoded from one video (decoding is sequential up to the last sampled frame): a
    # safety cap on decode time whatever the header claims. 36,000 = 10 minutes at 60 fps.
    max_decoded_frames: int = 36_000
    # Media tokens per request (all images and video chunks). 131,072: half of K2.6's context;
    # ~4 minutes of 1080p video or 31 images at the 4,225-token maximum; bounds the encoder pass
    # and the pixel memory held for one request (~9.4 KiB of uint8 pixels per video token).
    max_media_tokens: int = 131_072

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_video_seconds":
                if not (_is_number(value) and math.isfinite(value) and value > 0):
                    raise ValueError(f"max_video_seconds: must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{f.name}: must be a positive integer, got {value!r}")

    def check_items(self, count: int) -> None:
        """Refuses a request with more than ``max_items`` images + videos."""
        if count > self.max_items:
            raise MediaError(
                f"{count} media items in one request, over the limit of {self.max_items}",
                reason=TOO_LARGE,
            )

    def check_tokens(self, total: int) -> None:
        """Refuses a request whose media come to more than ``max_media_tokens`` tokens."""
        if total > self.max_media_tokens:
            raise MediaError(
                f"the media in this request come to {total} tokens, over the limit of "
                f"{self.max_media_tokens}",
                reason=TOO_LARGE,
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"{PREPROCESSOR_CONFIG}: media_proc_cfg.{name}: must be a positive integer, got "
            f"{value!r}"
        )


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        _positive_int(name, value)
