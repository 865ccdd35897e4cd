"""Vision embeddings for the prompt positions a step computes: the encoder, its cache, and the
prefix-cache keys of media positions.

A request's media are :class:`~kimi_grpc.media.request.MediaSpan` s: chunk ``c`` fills prompt
positions ``[offset, offset + c.num_tokens)``, all ``<|media_pad|>``. A step computes positions
``[start, start + n)`` of each scheduled sequence (a prefill chunk may cut a span anywhere, a
prefix-cache hit may end inside one, a preempted sequence recomputes from 0); for every span
that range touches, :meth:`MediaEncoder.step_embeddings` takes that chunk's embeddings from the
sequence's own hold (a span it is part-way through), the :class:`EncoderCache` (keyed by the
chunk's content hash) or encodes it, and hands the model the rows for exactly the positions in
range. The hold keeps a chunk a sequence stopped inside until the sequence passes its end, so a
chunk is encoded once per request even when the cache cannot keep it (capacity, eviction by
other requests); a sequence holds at most one chunk (a step's range is contiguous).

Prefix caching: page hashes are computed over token ids, and every media position holds the
same pad id, so two different images behind the same text would share KV. :func:`cache_keys`
gives the block manager the ids with each media position replaced by a negative key derived
from its chunk's content hash and its place in the chunk (real ids are >= 0, so a key never
equals a token): the same image again hits, a different one never does.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimi_grpc.media.chunk import VisionChunk, pack_pixel_values
from kimi_grpc.media.request import MediaSpan
from kimi_grpc.model.vision import KimiVisionModel

_KEY_BITS = (1 << 62) - 1
# Patches the encoder takes in one forward (float32 pixel values: 588 values per patch, ~2.3 KiB);
# a step needing more runs several forwards. 65,536 patches: ~150 MiB of pixel values, about four
# of the largest images (16,384 patches each).
MAX_ENCODER_BATCH_PATCHES = 65_536


def cache_keys(token_ids: list[int], spans: Sequence[MediaSpan]) -> list[int]:
    """``token_ids`` with every media position replaced by its prefix-cache key: position ``k``
    of a chunk gets ``-1 - ((h[k % 2] + k) mod 2^62)``, ``h`` the two 64-bit halves of the chunk's
    128-bit content hash, so a page holding two or more positions of a chunk carries the whole
    hash."""
    if not spans:
        return token_ids
    keys = list(token_ids)
    for span in spans:
        digest = span.chunk.content_hash
        halves = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little"))
        for k in range(span.chunk.num_tokens):
            keys[span.offset + k] = -1 - ((halves[k & 1] + k) & _KEY_BITS)
    return keys


class EncoderCache:
    """LRU of chunk embeddings ``[num_tokens, hidden]`` keyed by content hash, bounded in tokens.
    A chunk larger than the whole capacity is used once and not kept."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.capacity_tokens = capacity_tokens
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self._entries or value.shape[0] > self.capacity_tokens:
            return
        while self.tokens + value.shape[0] > self.capacity_tokens:
            _, old = self._entries.popitem(last=False)
            self.tokens -= old.shape[0]
        self._entries[key] = value
        self.tokens += value.shape[0]


# One sequence's chunk in progress (content hash -> embeddings), kept on the sequence.
Hold = dict[bytes, torch.Tensor]
StepRange = tuple[Sequence[MediaSpan], int, int, Hold]  # (spans, start, n, hold)


@dataclass
class StepMedia:
    """What one step splices into the embedded tokens: ``embeds[i]`` replaces the embedding of
    flat batch token ``rows[i]``."""

    rows: list[int]
    embeds: torch.Tensor  # [len(rows), hidden], the text model's dtype and device


class MediaEncoder:
    """The vision model and its cache, run by the engine before each forward that computes
    media positions (on tensor-parallel rank 0; the model shares the rows with the others)."""

    def __init__(self, vision: KimiVisionModel, cache_tokens: int) -> None:
        self.vision = vision
        self.cache = EncoderCache(cache_tokens)
        self.encoded_chunks = 0  # encoder forwards' chunks (cache misses actually encoded)
        self.encode_seconds = 0.0  # wall time in the encoder (pixel values + tower + projector)

    def step_embeddings(self, ranges: Sequence[StepRange]) -> StepMedia | None:
        """``ranges[b] = (spans, start, n, hold)``: sequence b computes prompt positions
        ``[start, start + n)``, laid out one after the other in the flat batch; ``hold`` is its
        own dict of the chunk it is part-way through. None when no position in range is a media
        position."""
        pieces: list[tuple[int, VisionChunk, int, int, Hold]] = []  # (row, chunk, from, to, hold)
        base = 0
        for spans, start, n, hold in ranges:
            end = start + n
            if spans and start < spans[-1].end:  # decodes past the media: nothing to look at
                for span in spans:
                    if span.end <= start:
                        continue
                    if span.offset >= end:
                        break
                    lo, hi = max(span.offset, start), min(span.end, end)
                    row = base + lo - start
                    pieces.append((row, span.chunk, lo - span.offset, hi - span.offset, hold))
            base += n
        if not pieces:
            return None
        embeddings = self._embeddings([(chunk, hold) for _, chunk, _, _, hold in pieces])
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for row, chunk, lo, hi, hold in pieces:
            key = chunk.content_hash
            rows.extend(range(row, row + hi - lo))
            parts.append(embeddings[key][lo:hi])
            if hi < chunk.num_tokens:  # stopped inside the chunk: keep it for the next step
                hold.clear()
                hold[key] = embeddings[key]
            else:
                hold.pop(key, None)
        return StepMedia(rows, torch.cat(parts))

    def _embeddings(self, chunks: list[tuple[VisionChunk, Hold]]) -> dict[bytes, torch.Tensor]:
        """Every chunk's embeddings: held, cached, or encoded now (each distinct chunk once)."""
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, VisionChunk] = {}
        for chunk, hold in chunks:
            key = chunk.content_hash
            if key in found or key in missing:
                continue
            if key in hold:
                found[key] = hold[key]
                continue
            cached = self.cache.get(key)
            if cached is None:
                missing[key] = chunk
            else:
                found[key] = cached
        batch: list[VisionChunk] = []
        patches = 0
        for chunk in missing.values():
            if batch and patches + chunk.num_patches > MAX_ENCODER_BATCH_PATCHES:
                self._encode(batch, found)
                batch, patches = [], 0
            batch.append(chunk)
            patches += chunk.num_patches
        if batch:
            self._encode(batch, found)
        return found

    def _encode(self, chunks: list[VisionChunk], out: dict[bytes, torch.Tensor]) -> None:
        start = time.perf_counter()
        pixel_values, grid_thw = pack_pixel_values(chunks)
        outputs = self.vision(pixel_values, grid_thw)
        if len(outputs) > 1:  # views of one tensor: own copies, so eviction frees the memory
            outputs = [embeds.clone() for embeds in outputs]
        for chunk, embeds in zip(chunks, outputs, strict=True):
            if embeds.shape[0] != chunk.num_tokens:
                raise RuntimeError(
                    f"the vision model gave {embeds.shape[0]} embeddings for a chunk of "
                    f"{chunk.num_tokens} tokens"
                )
            out[chunk.content_hash] = embeds
            self.cache.put(chunk.content_hash, embeds)
        self.encoded_chunks += len(chunks)
        self.encode_seconds += time.perf_counter() - start
