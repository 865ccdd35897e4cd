"""Videos: bytes -> PyAV streaming decode of the sampled frames -> :class:`VisionChunk` per 4.

The rule is Moonshot's (spec §4.5; pure parts in :mod:`kimi_grpc.media.sampling`): sample
``min(2, fps)`` frames per second by frame index, group them 4 by 4, resize every frame of a chunk
with the plan of the chunk's **first** frame under the per-frame budget (4096 patches), one
``<|media_pad|>`` group of ``(H/28) * (W/28)`` tokens per chunk whatever its frame count.

Memory: the decoded video is never held. Frames are decoded in order (FFmpeg's own threads);
a frame that is not sampled is dropped as soon as it is counted (no RGB conversion); a sampled
frame goes to one worker thread that converts it to RGB, resizes it (Pillow, GIL released) and
copies it into its chunk's uint8 buffer while decoding goes on (at most 8 frames wait); decoding
stops after the last sampled frame. What stays is the chunks' uint8 pixels (~9.4 KiB per token,
~0.29 GiB for 60 s of 1080p) and the decoder's reference frames.

Metadata (read before decoding, every limit checked then):

* container: only the mp4/mov, Matroska/WebM and AVI demuxers are even tried (FFmpeg's
  ``format_whitelist``); codecs: H.264, H.265, VP8, VP9, AV1, MPEG-4 part 2, MJPEG, MPEG-1/2;
* frame size: the stream header's, checked against ``max_video_frame_pixels`` (and every decoded
  frame again, for streams that change resolution);
* average fps: the stream's ``avg_frame_rate`` (FFmpeg derives it from the frame count and
  duration; for variable-frame-rate video that is the mean rate, as in the reference), else its
  guessed rate;
* frame count: the header's (``nb_frames``: mp4/mov sample tables, AVI ``dwLength``). Matroska /
  WebM headers carry none (``stream.frames == 0``); there we count the stream's packets in a
  demux-only pass (no decoding, ~ms per MB). That is the exact number of frames the decoder will
  produce, where ``duration x fps`` (decord's old fallback) is an estimate that can be off by a
  frame and so move every sampled index. The header's duration is checked against the limit
  before the pass, so an over-long file is refused without it;
* length: ``num_frames / avg_fps`` seconds (the clock the timestamps use).

A header that claims more frames than the stream holds (truncated file, odd edit lists): if the
missing sampled frames are within one second of the end, they repeat the last decoded frame;
otherwise the video is refused as truncated.

Colour: frames are converted to RGB by FFmpeg's swscale using the stream's colour matrix
(BT.709 for HD when tagged; untagged streams get swscale's BT.601 default), as FFmpeg-based
readers (decord, torchcodec) do; exact RGB values of Moonshot's ``mecord`` reader are unknown.
Frames are used as stored: a rotation tag (portrait phone video) is not applied, as decord does
not apply it either (mecord: unknown).
"""

from __future__ import annotations

import io
import logging
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import av
import numpy as np
import torch
from PIL import Image

from kimi_grpc.media.chunk import VisionChunk
from kimi_grpc.media.config import MediaConfig, MediaLimits
from kimi_grpc.media.errors import EMPTY, TOO_LARGE, UNDECODABLE, UNSUPPORTED, MediaError
from kimi_grpc.media.hashing import chunk_hash, item_hash
from kimi_grpc.media.prompt import video_prompt
from kimi_grpc.media.resize import ResizePlan, video_chunk_resize_plan
from kimi_grpc.media.sampling import ChunkPlan, SamplingPlan, plan_sampling

logger = logging.getLogger(__name__)

# FFmpeg demuxer names (mp4 and mov share one; so do mkv and webm).
VIDEO_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi")
_FORMAT_WHITELIST = ",".join(VIDEO_CONTAINERS)
# Codec (AVCodecID) names; the decoder may be another implementation (AV1 -> libdav1d).
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg", "mpeg1video", "mpeg2video")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says, before any frame is decoded."""

    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # e.g. "h264"
    width: int  # frame size claimed by the stream header
    height: int
    num_frames: int
    frames_from: str  # "header" (nb_frames) or "packets" (counted by a demux pass)
    avg_fps: float

    @property
    def seconds(self) -> float:
        return self.num_frames / self.avg_fps


@dataclass(frozen=True)
class VideoPlan:
    """A video's metadata, sampling and token cost, known before decoding (the header's frame
    size; a stream that changes resolution may end up costing differently)."""

    info: VideoInfo
    sampling: SamplingPlan
    chunk_tokens: tuple[int, ...]  # per chunk, from the header's frame size

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)


@dataclass(frozen=True, eq=False)
class ProcessedVideo:
    """A preprocessed video: its chunks in order and the text that stands for it."""

    chunks: tuple[VisionChunk, ...]
    plan: VideoPlan
    decoded_frames: int  # frames the decoder produced (stops after the last sampled one)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def prompt(self) -> str:
        """Replaces the template's video placeholder (one timestamped span per chunk)."""
        return video_prompt([chunk.timestamp or "" for chunk in self.chunks])

    @property
    def content_hash(self) -> bytes:
        return item_hash(chunk.content_hash for chunk in self.chunks)


def plan_video(
    data: bytes, config: MediaConfig | None = None, limits: MediaLimits | None = None
) -> VideoPlan:
    """Reads the container's metadata (no frame decoding) and checks every limit that does not
    need pixels. Raises :class:`MediaError`."""
    config = config or MediaConfig()
    limits = limits or MediaLimits()
    _check_bytes(data, limits)
    with _open(data) as container:
        return _plan(data, container, _video_stream(container), config, limits)


def preprocess_video(
    data: bytes,
    config: MediaConfig | None = None,
    limits: MediaLimits | None = None,
    *,
    max_tokens: int | None = None,
    threads: int = 0,
) -> ProcessedVideo:
    """Encoded video bytes -> its chunks. ``max_tokens``: what is left of the request's
    media-token budget (checked from the header before decoding, and again on the real frame
    sizes). ``threads``: decoder threads (0: FFmpeg picks, one per core). Blocking (seconds for
    a long video): run it off the event loop."""
    config = config or MediaConfig()
    limits = limits or MediaLimits()
    budget = limits.max_media_tokens if max_tokens is None else max_tokens
    _check_bytes(data, limits)
    with _open(data) as container:
        stream = _video_stream(container)
        plan = _plan(data, container, stream, config, limits)
        if plan.num_tokens > budget:
            raise MediaError(
                f"the video costs {plan.num_tokens} tokens ({len(plan.chunk_tokens)} chunks at "
                f"{plan.info.width}x{plan.info.height}), over the {budget} media tokens left in "
                "this request",
                reason=TOO_LARGE,
            )
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        decoder = _ChunkDecoder(container, stream, plan, config, limits, budget)
        chunks = tuple(decoder.run())
    return ProcessedVideo(chunks, plan, decoder.decoded)


# --- metadata ---------------------------------------------------------------------------------


def _check_bytes(data: bytes, limits: MediaLimits) -> None:
    if not data:
        raise MediaError("the video is empty (0 bytes)", reason=EMPTY)
    if len(data) > limits.max_video_bytes:
        raise MediaError(
            f"the video is {len(data)} bytes, over the limit of {limits.max_video_bytes}",
            reason=TOO_LARGE,
        )


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            options={"format_whitelist": _FORMAT_WHITELIST},
            metadata_errors="ignore",
        )
    except av.error.FFmpegError as exc:  # unknown format, or a known one too broken to open
        raise MediaError(
            "cannot open the video: the data is not a readable mp4, mov, mkv, webm or avi file "
            f"(FFmpeg: {_ffmpeg_message(exc)})",
            reason=UNDECODABLE,
        ) from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # skip cover art
            return stream
    raise MediaError(f"the {_container_name(container)} file has no video stream", reason=EMPTY)


def _plan(
    data: bytes,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    config: MediaConfig,
    limits: MediaLimits,
) -> VideoPlan:
    kind = _container_name(container)
    try:
        codec = stream.codec_context.codec.canonical_name
    except Exception:  # no decoder for this codec in the bundled FFmpeg
        codec = getattr(stream.codec_context, "name", None) or "an unknown"
    if codec not in VIDEO_CODECS:
        raise MediaError(
            f"the {kind} video uses the {codec} codec; supported: H.264, H.265, VP8, VP9, AV1, "
            "MPEG-4, MJPEG, MPEG-1/2",
            reason=UNSUPPORTED,
        )
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise MediaError(f"the {kind} video has no frame size ({width}x{height})", reason=EMPTY)
    if width * height > limits.max_video_frame_pixels:
        raise MediaError(
            f"the video's frames are {width}x{height} = {width * height} pixels, over the "
            f"limit of {limits.max_video_frame_pixels}",
            reason=TOO_LARGE,
        )
    avg_fps = _average_fps(stream)
    if avg_fps is None:
        raise MediaError(f"the {kind} video has no frame rate", reason=UNDECODABLE)
    seconds = _header_seconds(container, stream)
    if seconds is not None and seconds > limits.max_video_seconds:
        raise MediaError(_too_long(seconds, limits), reason=TOO_LARGE)
    num_frames, frames_from = stream.frames, "header"
    if num_frames <= 0:
        num_frames, frames_from = _count_packets(data, stream.index, limits), "packets"
    if num_frames <= 0:
        raise MediaError(f"the {kind} video has no frames", reason=EMPTY)
    if num_frames > limits.max_decoded_frames:
        raise MediaError(
            f"the video has {num_frames} frames, over the decoding limit of "
            f"{limits.max_decoded_frames}",
            reason=TOO_LARGE,
        )
    info = VideoInfo(kind, codec, width, height, num_frames, frames_from, avg_fps)
    if info.seconds > limits.max_video_seconds:
        raise MediaError(_too_long(info.seconds, limits), reason=TOO_LARGE)
    sampling = plan_sampling(num_frames, avg_fps, config)
    if len(sampling.indices) > limits.max_video_frames:
        raise MediaError(
            f"the video samples to {len(sampling.indices)} frames ({info.seconds:.1f} s at "
            f"{min(config.sample_fps, avg_fps):g} fps), over the limit of "
            f"{limits.max_video_frames}",
            reason=TOO_LARGE,
        )
    chunk_tokens = tuple(
        video_chunk_resize_plan(width, height, len(chunk.frame_indices), config).num_tokens
        for chunk in sampling.chunks
    )
    return VideoPlan(info, sampling, chunk_tokens)


def _container_name(container: av.container.InputContainer) -> str:
    names = container.format.name
    return {"mov,mp4,m4a,3gp,3g2,mj2": "mp4/mov", "matroska,webm": "mkv/webm"}.get(names, names)


def _average_fps(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            fps = float(rate)
            if math.isfinite(fps):
                return fps
    return None


def _header_seconds(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _count_packets(data: bytes, stream_index: int, limits: MediaLimits) -> int:
    """The stream's packets (= frames) in a demux-only pass on a second handle (no seeking
    back, which could land after the first packets of a stream that does not start on a
    keyframe). Stops counting past ``max_decoded_frames``."""
    count = 0
    with _open(data) as container:
        try:
            for packet in container.demux(container.streams[stream_index]):
                if packet.size:
                    count += 1
                    if count > limits.max_decoded_frames:
                        break
        except av.error.FFmpegError as exc:
            raise MediaError(
                f"the video is corrupt (FFmpeg: {_ffmpeg_message(exc)})", reason=UNDECODABLE
            ) from None
    return count


def _too_long(seconds: float, limits: MediaLimits) -> str:
    return f"the video is {seconds:.1f} s long, over the limit of {limits.max_video_seconds:g} s"


# --- decoding ---------------------------------------------------------------------------------


@dataclass
class _FillingChunk:
    """A chunk whose frames are being converted on the worker thread."""

    plan: ChunkPlan
    resize: ResizePlan
    buffer: np.ndarray  # uint8 [t, H, W, 3], zero-initialised (the padding)
    source_size: tuple[int, int]
    converts: list[Future[None]] = field(default_factory=list)


class _ChunkDecoder:
    """Decodes in order on the calling thread; each sampled frame is converted (RGB, Pillow
    bicubic, copy into its chunk's buffer) on one worker thread, so conversion overlaps decoding;
    chunks come out in order as soon as their frames are in. At most ``_MAX_IN_FLIGHT`` decoded
    frames wait for the worker (bounded memory)."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        plan: VideoPlan,
        config: MediaConfig,
        limits: MediaLimits,
        budget: int,
    ) -> None:
        self.container, self.stream, self.plan = container, stream, plan
        self.config, self.limits, self.budget = config, limits, budget
        self.decoded = 0  # frames produced by the decoder so far (= next frame's index)
        self.error: str | None = None  # FFmpeg's message if decoding failed
        self.tokens = 0
        self._filling: _FillingChunk | None = None
        self._full: deque[_FillingChunk] = deque()  # every frame submitted, in chunk order
        self._in_flight: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def run(self) -> Iterator[VisionChunk]:
        with ThreadPoolExecutor(1, thread_name_prefix="kimi-video") as pool:
            self._pool = pool
            try:
                yield from self._run()
            finally:
                for future in self._in_flight:
                    future.cancel()

    def _run(self) -> Iterator[VisionChunk]:
        indices = self.plan.sampling.indices
        chunk_plans = self.plan.sampling.chunks
        size = self.config.temporal_merge_kernel_size
        pos = 0  # next sampled position
        last: av.VideoFrame | None = None
        for frame in self._frames():
            index = self.decoded
            self.decoded += 1
            while pos < len(indices) and indices[pos] == index:
                self._add(chunk_plans[pos // size], frame)
                pos += 1
            yield from self._finished(wait=False)
            if pos == len(indices):
                yield from self._finished(wait=True)
                return
            last = frame
            if self.decoded >= self.limits.max_decoded_frames:
                raise MediaError(
                    f"decoded {self.decoded} frames without reaching the sampled frame "
                    f"{indices[pos]}; over the decoding limit",
                    reason=TOO_LARGE,
                )
        missing = indices[pos:]
        tolerance = max(1, math.ceil(self.plan.info.avg_fps))  # one second of frames
        if last is None or missing[-1] - (self.decoded - 1) > tolerance:
            if self.error is not None:
                raise MediaError(
                    f"the video is corrupt after frame {self.decoded} (FFmpeg: {self.error})",
                    reason=UNDECODABLE,
                )
            if last is None:
                raise MediaError("the video has no decodable frames", reason=EMPTY)
            raise MediaError(
                f"the video ends after {self.decoded} frames but its header claims "
                f"{self.plan.info.num_frames} (truncated or corrupt)",
                reason=UNDECODABLE,
            )
        logger.debug("video: %d sampled frames past the end repeat the last", len(missing))
        for p in range(pos, len(indices)):
            self._add(chunk_plans[p // size], last)
        yield from self._finished(wait=True)

    def _frames(self) -> Iterator[av.VideoFrame]:
        """Decoded frames in order. A decoding error ends the stream (recorded in ``error``):
        skipping the bad packet would shift every later frame number; the caller refuses the
        video unless only the last second's sampled frames are lost."""
        try:
            for packet in self.container.demux(self.stream):
                for frame in packet.decode():
                    if frame.width * frame.height > self.limits.max_video_frame_pixels:
                        raise MediaError(
                            f"frame {self.decoded} is {frame.width}x{frame.height}, over the "
                            f"limit of {self.limits.max_video_frame_pixels} pixels",
                            reason=TOO_LARGE,
                        )
                    yield frame
        except av.error.FFmpegError as exc:
            self.error = _ffmpeg_message(exc)
            logger.debug("video: decoding stopped after frame %d: %s", self.decoded, self.error)

    def _add(self, chunk: ChunkPlan, frame: av.VideoFrame) -> None:
        """Queues ``frame`` for conversion into ``chunk`` (whose first frame fixes its size)."""
        filling = self._filling
        if filling is None or filling.plan is not chunk:
            t = len(chunk.frame_indices)
            resize = video_chunk_resize_plan(frame.width, frame.height, t, self.config)
            self.tokens += resize.num_tokens
            if self.tokens > self.budget:
                raise MediaError(
                    f"the video's frames cost more than the {self.budget} media tokens left in "
                    "this request",
                    reason=TOO_LARGE,
                )
            buffer = np.zeros((t, resize.padded_height, resize.padded_width, 3), dtype=np.uint8)
            filling = _FillingChunk(chunk, resize, buffer, (frame.width, frame.height))
            self._filling = filling
        while len(self._in_flight) >= _MAX_IN_FLIGHT:
            self._in_flight.popleft().result()
        assert self._pool is not None
        slot = len(filling.converts)
        future = self._pool.submit(_convert, frame, filling.resize, filling.buffer, slot)
        filling.converts.append(future)
        self._in_flight.append(future)
        if len(filling.converts) == len(chunk.frame_indices):
            self._full.append(filling)

    def _finished(self, wait: bool) -> Iterator[VisionChunk]:
        """The full chunks at the head of the queue whose frames are converted (all of them
        when ``wait``), in order."""
        while self._full and (wait or all(f.done() for f in self._full[0].converts)):
            filling = self._full.popleft()
            for future in filling.converts:
                future.result()  # re-raises a conversion error
            while self._in_flight and self._in_flight[0].done():
                self._in_flight.popleft()
            frames = torch.from_numpy(filling.buffer)
            grid = filling.resize.grid_thw(len(filling.plan.frame_indices))
            yield VisionChunk(
                kind="video",
                frames=frames,
                grid_thw=grid,
                num_tokens=filling.resize.num_tokens,
                content_hash=chunk_hash(frames, grid, self.config),
                config=self.config,
                timestamp=filling.plan.timestamp,
                frame_indices=filling.plan.frame_indices,
                source_size=filling.source_size,
            )


_MAX_IN_FLIGHT = 8  # decoded frames queued for conversion (~3 MiB each at 1080p)


def _convert(frame: av.VideoFrame, resize: ResizePlan, buffer: np.ndarray, slot: int) -> None:
    """One sampled frame -> RGB -> Pillow bicubic to the chunk's size -> ``buffer[slot]``."""
    try:
        image = frame.to_image()  # RGB, full size
    except (av.error.FFmpegError, ValueError) as exc:
        raise MediaError(
            f"cannot convert a {frame.format.name} frame to RGB: {exc}", reason=UNSUPPORTED
        ) from None
    if image.size != (resize.width, resize.height):
        image = image.resize((resize.width, resize.height), resample=Image.Resampling.BICUBIC)
    buffer[slot, : resize.height, : resize.width] = np.asarray(image)


def _ffmpeg_message(exc: av.error.FFmpegError) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without the errno and
    the placeholder file name PyAV appends for in-memory input."""
    return (getattr(exc, "strerror", None) or type(exc).__name__).strip()
