"""Content hashes of vision chunks: the encoder-cache key and the prefix-cache extra key.

A chunk's embeddings are a pure function of its preprocessed pixels, its grid and the settings
that shaped them, so that is exactly what is hashed (spec §6 recommends hashing decoded pixels
plus the resize config, never the URL or the encoded bytes):

    blake2b-128( person "kimi-media-v1" ; config fingerprint ; grid (t, h, w) ; pixels )

``pixels`` are the chunk's resized, zero-padded uint8 RGB frames ``[t, H, W, 3]``. They determine
the normalised float tensor one-to-one (normalisation is a fixed per-channel table given the
fingerprint's mean/std), so hashing them is equivalent to hashing ``pixel_values`` and reads a
quarter of the bytes. Consequences: the same image sent twice (any encoding: PNG or a lossless
WebP of it) hits; two images that differ in one pixel after resizing never share; the chunk's
position in the prompt or the video is not part of the key (the prefix cache chains hashes over
the preceding tokens, so position is already covered there, and identical pixels encode
identically wherever they sit).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

import torch

from kimi_grpc.media.config import MediaConfig

DIGEST_BYTES = 16
_PERSON = b"kimi-media-v1"


def chunk_hash(
    frames: torch.Tensor,  # uint8 [t, H, W, 3], contiguous, on the CPU
    grid_thw: tuple[int, int, int],
    config: MediaConfig,
) -> bytes:
    """The 16-byte content hash of one chunk."""
    if frames.dtype != torch.uint8 or frames.device.type != "cpu":
        raise ValueError("chunk_hash expects CPU uint8 frames")
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_PERSON)
    fingerprint = config.fingerprint()
    h.update(struct.pack("<q", len(fingerprint)))
    h.update(fingerprint)
    h.update(struct.pack("<3q", *grid_thw))
    h.update(memoryview(frames.contiguous().numpy()).cast("B"))
    return h.digest()


def item_hash(chunk_hashes: Iterable[bytes]) -> bytes:
    """One key for a whole item (an image's single chunk, or all chunks of a video in order)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_PERSON)
    for digest in chunk_hashes:
        h.update(digest)
    return h.digest()
