"""Images: bytes -> guarded Pillow decode -> Kimi's resize / pad -> one :class:`VisionChunk`.

Decoding (spec §4.1, Moonshot's ``_to_pil``): ``Image.open(...).convert("RGB")``. Consequences we
keep for parity with the reference processor:

* alpha is **dropped**, not composited: a transparent pixel shows whatever RGB it stores
  (usually black). vLLM composites RGBA on white instead; Moonshot's processor does not, and the
  model was tuned on Moonshot's; clients who want a background should flatten before sending;
* palette (P), grayscale (L, LA, 1), CMYK and 16-bit images convert the way Pillow converts them
  (16-bit grayscale saturates, as in the reference);
* EXIF orientation is ignored (no ``exif_transpose``): the pixels are used as stored;
* GIF and animated WebP: the first frame.

Guards before any pixel is decoded: the byte size, the format (only PNG, JPEG, WebP, GIF and BMP
plugins are even tried, so a TIFF, a PSD or a zip renamed to .png is refused at identification),
and the header's width x height against ``MediaLimits.max_image_pixels``. ``Image.open`` reads
only the header; Pillow's own decompression-bomb check (an error above 2 x
``Image.MAX_IMAGE_PIXELS`` = 179 MP) is turned into the same :class:`MediaError`, so a PNG that
claims 50,000 x 50,000 costs a header parse. Every exception Pillow or zlib raises on bad data
becomes a :class:`MediaError`.

Pixels (spec §4.3): Pillow ``resize(BICUBIC)`` on uint8 RGB (an unchanged size is an identity
copy), zero-pad bottom / right to a multiple of 28, patchify + normalise lazily (chunk.py).
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kimi_grpc.media.chunk import VisionChunk
from kimi_grpc.media.config import MediaConfig, MediaLimits
from kimi_grpc.media.errors import EMPTY, TOO_LARGE, UNDECODABLE, UNSUPPORTED, MediaError
from kimi_grpc.media.hashing import chunk_hash
from kimi_grpc.media.resize import ResizePlan, image_resize_plan

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow format names


def decode_image(data: bytes, limits: MediaLimits | None = None) -> Image.Image:
    """Encoded bytes -> an RGB ``PIL.Image`` (first frame), or :class:`MediaError`."""
    limits = limits or MediaLimits()
    if not data:
        raise MediaError("the image is empty (0 bytes)", reason=EMPTY)
    if len(data) > limits.max_image_bytes:
        raise MediaError(
            f"the image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
            reason=TOO_LARGE,
        )
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # header only
    except Image.DecompressionBombError as exc:  # Pillow's own cap (2 x MAX_IMAGE_PIXELS)
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{claimed.group(1)} pixels" if claimed else "more pixels than Pillow allows"
        cap = limits.max_image_pixels
        if Image.MAX_IMAGE_PIXELS:  # a configured limit above Pillow's cannot be reached
            cap = min(cap, 2 * Image.MAX_IMAGE_PIXELS)
        raise MediaError(
            f"the image claims {what}, over the limit of {cap}", reason=TOO_LARGE
        ) from None
    except UnidentifiedImageError:
        raise MediaError(
            "not a supported image: the data is not PNG, JPEG, WebP, GIF or BMP",
            reason=UNSUPPORTED,
        ) from None
    except Exception as exc:  # any plugin error on a malformed header
        raise MediaError(f"cannot read the image header: {_describe(exc)}") from None
    with image:
        fmt = image.format or "?"
        if fmt not in IMAGE_FORMATS:  # defensive: formats= already restricts the plugins
            raise MediaError(f"unsupported image format {fmt}", reason=UNSUPPORTED)
        width, height = image.size
        if width < 1 or height < 1:
            raise MediaError(f"the {fmt} image has no pixels ({width}x{height})", reason=EMPTY)
        if width * height > limits.max_image_pixels:
            raise MediaError(
                f"the {fmt} image is {width}x{height} = {width * height} pixels, over the limit "
                f"of {limits.max_image_pixels}",
                reason=TOO_LARGE,
            )
        try:
            rgb = image.convert("RGB")  # decodes (the first frame only) and drops alpha
        except Exception as exc:  # truncated data, zlib errors, bad Huffman tables, ...
            raise MediaError(
                f"the {fmt} image is corrupt or truncated: {_describe(exc)}", reason=UNDECODABLE
            ) from None
    return rgb


def resize_and_pad(image: Image.Image, plan: ResizePlan) -> np.ndarray:
    """RGB image -> uint8 ``[H' + pad_h, W' + pad_w, 3]``: Pillow bicubic, then zeros
    bottom / right (Moonshot's ``image_to_np`` + ``np.pad``)."""
    if image.size != (plan.width, plan.height):
        image = image.resize((plan.width, plan.height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)  # [H', W', 3]
    out = np.zeros((plan.padded_height, plan.padded_width, 3), dtype=np.uint8)
    out[: plan.height, : plan.width] = pixels
    return out


def image_to_chunk(image: Image.Image, config: MediaConfig | None = None) -> VisionChunk:
    """A decoded RGB image -> its :class:`VisionChunk` (grid ``(1, h, w)``)."""
    config = config or MediaConfig()
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    plan = image_resize_plan(image.width, image.height, config)
    frames = torch.from_numpy(resize_and_pad(image, plan)).unsqueeze(0)  # [1, H, W, 3]
    grid = plan.grid_thw(1)
    return VisionChunk(
        kind="image",
        frames=frames,
        grid_thw=grid,
        num_tokens=plan.num_tokens,
        content_hash=chunk_hash(frames, grid, config),
        config=config,
        source_size=(image.width, image.height),
    )


def image_num_tokens(width: int, height: int, config: MediaConfig | None = None) -> int:
    """Tokens an image of this size costs (no pixels needed)."""
    return image_resize_plan(width, height, config or MediaConfig()).num_tokens


def preprocess_image(
    data: bytes,
    config: MediaConfig | None = None,
    limits: MediaLimits | None = None,
    *,
    max_tokens: int | None = None,
) -> VisionChunk:
    """Encoded image bytes -> one :class:`VisionChunk`. ``max_tokens``: what is left of the
    request's media-token budget (refused before resizing when the image costs more).
    Blocking (decode + resize take tens of milliseconds): run it off the event loop."""
    config = config or MediaConfig()
    limits = limits or MediaLimits()
    image = decode_image(data, limits)
    budget = limits.max_media_tokens if max_tokens is None else max_tokens
    tokens = image_num_tokens(image.width, image.height, config)
    if tokens > budget:
        raise MediaError(
            f"the image costs {tokens} tokens, over the {budget} media tokens left in this request",
            reason=TOO_LARGE,
        )
    return image_to_chunk(image, config)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
