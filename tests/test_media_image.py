"""Images: Pillow decode with guards, Kimi's resize / pad / normalise / patchify, content hashes.

Pixels are compared with an independent NumPy transcription of Moonshot's processor
(``media_utils``: ``image_to_np`` -> ``np.pad`` -> ``normalize`` -> ``navit_patchify``), which must
agree bit for bit. transformers' port cannot serve as the pixel reference here: it resizes with
torchvision (not installed; also not Pillow's bicubic), so it is compared on sizes only
(test_media_config.py). Every input is built by the test.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from kimi_grpc.media import (
    MediaConfig,
    MediaError,
    MediaLimits,
    decode_image,
    image_to_chunk,
    pack_pixel_values,
    preprocess_image,
)
from kimi_grpc.media.chunk import normalize, patchify
from kimi_grpc.media.resize import navit_resize


def reference_pixel_values(image: Image.Image, config: MediaConfig | None = None) -> np.ndarray:
    """Moonshot's image path, written out with NumPy (float32 [L, 3, 14, 14])."""
    config = config or MediaConfig()
    p = config.patch_size
    w, h = image.size
    s1 = (config.in_patch_limit / (max(1.0, w // p) * max(1.0, h // p))) ** 0.5
    s2, s3 = 512 * p / w, 512 * p / h
    scale = min(1.0, s1, s2, s3)
    new_w, new_h = min(max(1, int(w * scale)), 512 * p), min(max(1, int(h * scale)), 512 * p)
    pad_w, pad_h = (28 - new_w % 28) % 28, (28 - new_h % 28) % 28
    x = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    x = np.pad(x, ((0, pad_h), (0, pad_w), (0, 0)), mode="constant", constant_values=0)
    x = (x[None] / 255.0).astype(np.float32)  # normalize(): float64 / 255 -> float32
    x -= np.array(config.image_mean, dtype=np.float32)
    x *= 1.0 / np.array(config.image_std, dtype=np.float32)
    t, hh, ww, c = x.shape
    x = x.reshape(t, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(-1, c, p, p)


def synthetic_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients + a little noise + a hard edge: exercises bicubic in every direction."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack(
        [xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx ^ yy) & 255], -1
    ).astype(np.int32)
    img += rng.integers(-20, 21, img.shape)
    img[: height // 3, : width // 3] = (250, 5, 120)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def assert_matches_reference(data: bytes, config: MediaConfig | None = None):
    config = config or MediaConfig()
    chunk = preprocess_image(data, config)
    expected_rgb = Image.open(io.BytesIO(data)).convert("RGB")  # the reference decode
    expected = reference_pixel_values(expected_rgb, config)
    got = chunk.pixel_values()
    assert got.dtype == torch.float32
    assert tuple(got.shape) == expected.shape
    assert torch.equal(got, torch.from_numpy(expected))
    t, h, w = chunk.grid_thw
    assert got.shape[0] == chunk.num_patches == t * h * w and t == 1
    assert chunk.num_tokens == (h // 2) * (w // 2)
    assert chunk.kind == "image" and chunk.timestamp is None
    return chunk


# --- pixels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [(300, 200), (640, 480), (1920, 1080), (2100, 900), (17, 64), (28, 28), (1, 1), (5, 3000)],
)
def test_pixels_equal_moonshot_processor(size):
    image = Image.fromarray(synthetic_rgb(*size))
    chunk = assert_matches_reference(encode(image, "PNG"))
    plan = navit_resize(*size)
    assert chunk.grid_thw == plan.grid_thw(1)
    assert chunk.source_size == size


def test_large_image_is_downscaled_with_pillow_bicubic():
    image = Image.fromarray(synthetic_rgb(3000, 2000, seed=1))
    chunk = assert_matches_reference(encode(image, "PNG"))
    assert chunk.grid_thw == (1, 106, 158) and chunk.num_tokens == 53 * 79
    # a different resampler (bilinear) would give other pixels: the comparison can fail
    plan = navit_resize(3000, 2000)
    bilinear = np.asarray(image.resize((plan.width, plan.height), Image.Resampling.BILINEAR))
    assert not np.array_equal(chunk.frames[0, : plan.height, : plan.width].numpy(), bilinear)


@pytest.mark.parametrize("size", [(3000, 2000), (2560, 1600), (1920, 1080)])
def test_tolerance_against_torch_antialiased_bicubic(size):
    """transformers' Kimi K2.5 processor resizes uint8 tensors with torchvision
    (``resize(BICUBIC, antialias=True)``: float bicubic with antialiasing, a = -0.75, rounded
    back to uint8), Moonshot's with Pillow (a = -0.5). torchvision cannot be imported here, so
    the same torch operation stands in for it. Documented tolerance on natural downscales: at
    most 16 of 255 levels anywhere (0.125 after normalisation), mean < 0.25 levels, fewer than
    0.1 % of values off by more than 2; sizes that need no resize are identical."""
    arr = synthetic_rgb(*size, seed=13)
    chunk = image_to_chunk(Image.fromarray(arr))
    plan = navit_resize(*size)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    if (plan.width, plan.height) != size:
        x = torch.nn.functional.interpolate(
            x, size=(plan.height, plan.width), mode="bicubic", antialias=True
        )
    theirs = x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    diff = (chunk.frames[0, : plan.height, : plan.width].int() - theirs.int()).abs().float()
    if (plan.width, plan.height) == size:
        assert diff.max() == 0
    else:
        assert 0 < diff.max() <= 16
        assert diff.mean() < 0.25
        assert (diff > 2).float().mean() < 1e-3


def test_unchanged_size_is_identity_and_padding_is_minus_one():
    pixels = synthetic_rgb(30, 20)
    chunk = preprocess_image(encode(Image.fromarray(pixels), "PNG"))
    frames = chunk.frames.numpy()
    assert frames.shape == (1, 28, 56, 3)
    assert np.array_equal(frames[0, :20, :30], pixels)
    assert not frames[0, 20:].any() and not frames[0, :, 30:].any()
    values = chunk.pixel_values()
    assert values.min() >= -1.0 and values.max() <= 1.0
    # the last patch (row 1, col 3) lies wholly in the padding
    assert torch.all(values[-1] == -1.0)


def test_patch_order_is_row_major_and_channel_first():
    """Patch k = (row k // w, col k % w); inside a patch [c, y, x]."""
    h_px, w_px = 28, 56  # grid (1, 2, 4)
    yy, xx = np.mgrid[0:h_px, 0:w_px]
    pixels = np.stack([xx * 4, yy * 9, np.full_like(xx, 7)], -1).astype(np.uint8)
    chunk = image_to_chunk(Image.fromarray(pixels))
    assert chunk.grid_thw == (1, 2, 4)
    values = chunk.pixel_values()
    norm = lambda u: (np.float32(u / 255.0) - np.float32(0.5)) * np.float32(2.0)  # noqa: E731
    for k in range(8):
        r, c = divmod(k, 4)
        for y, x in [(0, 0), (3, 11), (13, 13)]:
            gy, gx = 14 * r + y, 14 * c + x
            assert values[k, 0, y, x].item() == norm(gx * 4)
            assert values[k, 1, y, x].item() == norm(gy * 9)
            assert values[k, 2, y, x].item() == norm(7)


def test_normalisation_table_matches_moonshot_for_every_byte_and_other_mean_std():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 256, 1).expand(1, 1, 256, 3)
    for mean, std in [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.48, 0.45, 0.40), (0.27, 0.26, 0.28))]:
        config = MediaConfig(image_mean=mean, image_std=std)
        got = normalize(u.contiguous(), config)[0, 0].numpy()  # [256, 3]
        x = (np.arange(256)[:, None] / 255.0).astype(np.float32).repeat(3, 1)
        x -= np.array(mean, dtype=np.float32)
        x *= 1.0 / np.array(std, dtype=np.float32)
        assert np.array_equal(got, x)


def test_patchify_shape_and_errors():
    x = torch.arange(2 * 28 * 42 * 3).reshape(2, 28, 42, 3)
    out = patchify(x, 14)
    assert out.shape == (2 * 2 * 3, 3, 14, 14)
    assert out[7, 1, 2, 3] == x[1, 2, 14 + 3, 1]  # frame 1, patch (0, 1), channel 1, y 2, x 3
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 20, 28, 3), 14)


def test_pixel_values_dtype_cast_and_pack():
    a = preprocess_image(encode(Image.fromarray(synthetic_rgb(50, 40)), "PNG"))
    b = preprocess_image(encode(Image.fromarray(synthetic_rgb(100, 30, seed=3)), "PNG"))
    bf16 = a.pixel_values(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, a.pixel_values().bfloat16())
    pixel_values, grids = pack_pixel_values([a, b])
    assert grids.dtype == torch.int64 and grids.tolist() == [list(a.grid_thw), list(b.grid_thw)]
    assert pixel_values.shape[0] == a.num_patches + b.num_patches
    assert torch.equal(pixel_values[: a.num_patches], a.pixel_values())
    assert torch.equal(pixel_values[a.num_patches :], b.pixel_values())
    with pytest.raises(ValueError, match="no chunks"):
        pack_pixel_values([])


# --- formats and modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("WEBP", {"quality": 80}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("BMP", {}),
    ],
)
def test_formats(fmt, params):
    image = Image.fromarray(synthetic_rgb(320, 200, seed=5))
    data = encode(image, fmt, **params)
    chunk = assert_matches_reference(data)
    assert chunk.grid_thw == (1, 16, 24)
    if fmt in ("PNG", "BMP") or params.get("lossless"):
        assert np.array_equal(chunk.frames[0, :200, :320].numpy(), np.asarray(image))


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 30), color) for color in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    rgb = decode_image(buf.getvalue())
    assert np.array_equal(np.asarray(rgb)[5, 5], [255, 0, 0])


def test_animated_webp_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 30), color) for color in [(0, 200, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    rgb = decode_image(buf.getvalue())
    assert np.array_equal(np.asarray(rgb)[5, 5], [0, 200, 0])


def test_rgba_drops_alpha_without_compositing():
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = synthetic_rgb(40, 30)
    rgba[..., 3] = 0  # fully transparent ...
    rgba[:10, :, 3] = 255
    rgba[20, 20] = (200, 10, 10, 0)  # ... with colour underneath
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    chunk = assert_matches_reference(data)
    assert np.array_equal(chunk.frames[0, :30, :40].numpy(), rgba[..., :3])  # not on white/black
    assert chunk.frames[0, 20, 20].tolist() == [200, 10, 10]


@pytest.mark.parametrize("mode", ["P", "L", "LA", "1", "I;16", "CMYK"])
def test_other_modes_convert_like_pillow(mode):
    base = Image.fromarray(synthetic_rgb(64, 48, seed=7))
    if mode == "P":
        image = base.quantize(colors=16)
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 3)
    else:
        image = base.convert(mode)
    data = encode(image, "JPEG" if mode == "CMYK" else "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    chunk = assert_matches_reference(data)
    if mode in ("L", "LA"):
        rgb = chunk.frames[0, :48, :64].numpy()
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        assert np.array_equal(rgb[..., 0], np.asarray(base.convert("L")))


def test_palette_with_transparency():
    image = Image.new("P", (16, 8))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.paste(1, (0, 0, 8, 8))
    image.paste(2, (8, 0, 16, 8))
    data = encode(image, "PNG", transparency=1)
    rgb = np.asarray(decode_image(data))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 15].tolist() == [0, 255, 0]


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
def test_extreme_aspect_ratio_is_handled(size):
    image = Image.fromarray(synthetic_rgb(*size))
    start = time.perf_counter()
    chunk = assert_matches_reference(encode(image, "PNG"))
    assert time.perf_counter() - start < 5
    assert chunk.num_tokens == 256
    assert chunk.grid_thw == ((1, 512, 2) if size[0] == 1 else (1, 2, 512))


def test_tiny_image():
    chunk = assert_matches_reference(encode(Image.new("RGB", (1, 1), (255, 0, 51)), "PNG"))
    assert chunk.grid_thw == (1, 2, 2) and chunk.num_tokens == 1
    values = chunk.pixel_values()
    assert values[0, :, 0, 0].tolist() == [1.0, -1.0, pytest.approx(-0.6, abs=1e-6)]
    assert torch.all(values[0, :, 0, 1] == -1.0) and torch.all(values[1:] == -1.0)


# --- content hash -----------------------------------------------------------------------------


def test_content_hash_follows_pixels_not_encoding():
    pixels = synthetic_rgb(120, 90, seed=11)
    png = preprocess_image(encode(Image.fromarray(pixels), "PNG"))
    webp = preprocess_image(encode(Image.fromarray(pixels), "WEBP", lossless=True))
    bmp = preprocess_image(encode(Image.fromarray(pixels), "BMP"))
    assert len(png.content_hash) == 16
    assert png.content_hash == webp.content_hash == bmp.content_hash
    changed = pixels.copy()
    changed[45, 60, 1] ^= 1  # one bit of one pixel
    assert (
        preprocess_image(encode(Image.fromarray(changed), "PNG")).content_hash != png.content_hash
    )
    other_norm = MediaConfig(image_mean=(0.4, 0.4, 0.4))
    again = preprocess_image(encode(Image.fromarray(pixels), "PNG"), other_norm)
    assert again.content_hash != png.content_hash  # same pixels, other normalisation


# --- refused input ----------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (RGB, 8 bit) with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen and first image descriptor claim ``width x height``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return head + descriptor + b"\x02\x02\x44\x01\x00;"


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("image.png", b"not really" * 100)
    return buf.getvalue()


def _corrupt_idat() -> bytes:
    data = bytearray(encode(Image.fromarray(synthetic_rgb(200, 200)), "PNG", compress_level=1))
    start = data.index(b"IDAT") + 40
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(synthetic_rgb(200, 150)), fmt)
    return data[: len(data) // 2]


def _tiff() -> bytes:
    return encode(Image.fromarray(synthetic_rgb(20, 20)), "TIFF")


BAD_IMAGES = [
    ("empty", lambda: b"", "empty", "empty (0 bytes)"),
    ("random bytes", lambda: np.random.default_rng(1).bytes(5000), "unsupported", "not PNG"),
    ("zip renamed .png", _zip_bytes, "unsupported", "not PNG, JPEG, WebP, GIF or BMP"),
    ("tiff", _tiff, "unsupported", "not PNG"),
    ("text", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported", "not PNG"),
    ("truncated png", lambda: _truncated("PNG"), "undecodable", "PNG image is corrupt or trunc"),
    ("truncated jpeg", lambda: _truncated("JPEG"), "undecodable", "JPEG image is corrupt or tru"),
    ("corrupt png data", _corrupt_idat, "undecodable", "corrupt or truncated"),
    ("png header only", lambda: png_header_only(64, 64), "undecodable", "corrupt or truncated"),
    (
        "png claiming 50000x50000",
        lambda: png_header_only(50_000, 50_000),
        "too_large",
        "claims 2500000000 pixels, over the limit of 67108864",
    ),
    (
        "png claiming 9000x9000",
        lambda: png_header_only(9000, 9000),
        "too_large",
        "9000x9000 = 81000000 pixels, over the limit of 67108864",
    ),
    (
        "gif claiming 65535x65535",
        lambda: gif_header_only(65535, 65535),
        "too_large",
        "claims 4294836225 pixels, over the limit of 67108864",
    ),
    ("png with width 0", lambda: png_header_only(0, 10), "unsupported", "not PNG"),
]


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [pytest.param(make, reason, message, id=name) for name, make, reason, message in BAD_IMAGES],
)
def test_bad_images_are_media_errors(make, reason, message):
    data = make()
    start = time.perf_counter()
    with pytest.raises(MediaError) as info:
        preprocess_image(data)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded
    assert isinstance(info.value, ValueError)
    assert info.value.reason == reason, info.value.message
    assert message in info.value.message


def test_decompression_bomb_does_not_allocate():
    """The 50,000 x 50,000 header would be 7.5 GB of RGB: refused with the RSS unchanged."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    data = png_header_only(50_000, 50_000)
    before = proc.memory_info().rss
    for _ in range(20):
        with pytest.raises(MediaError, match="over the limit"):
            decode_image(data)
    assert proc.memory_info().rss - before < 32 * 2**20


def test_byte_and_pixel_limits_are_configurable():
    data = encode(Image.fromarray(synthetic_rgb(100, 100)), "PNG")
    with pytest.raises(MediaError, match=f"the image is {len(data)} bytes, over the limit of 1000"):
        preprocess_image(data, limits=MediaLimits(max_image_bytes=1000))
    with pytest.raises(MediaError, match="100x100 = 10000 pixels, over the limit of 9999"):
        preprocess_image(data, limits=MediaLimits(max_image_pixels=9999))
    preprocess_image(data, limits=MediaLimits(max_image_pixels=10_000, max_image_bytes=len(data)))


def test_token_budget():
    data = encode(Image.fromarray(synthetic_rgb(640, 480)), "PNG")  # 414 tokens
    assert preprocess_image(data, max_tokens=414).num_tokens == 414
    with pytest.raises(MediaError, match="costs 414 tokens, over the 413 media tokens left"):
        preprocess_image(data, max_tokens=413)
    with pytest.raises(MediaError, match="over the 100 media tokens left"):
        preprocess_image(data, limits=MediaLimits(max_media_tokens=100))


def test_image_to_chunk_wants_rgb():
    with pytest.raises(ValueError, match="RGB"):
        image_to_chunk(Image.new("L", (4, 4)))
