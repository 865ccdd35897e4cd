"""Media input: images and videos -> Kimi's vision chunks, exactly as Moonshot's processor.

``config`` (the checkpoint's ``media_proc_cfg``; the server's limits), ``errors`` (the one
exception), ``resize`` (Kimi's resize rule, pure), ``sampling`` (video frame sampling, chunking,
timestamps, pure), ``chunk`` (one encoder input and its pixel values), ``image`` (Pillow decode
with guards), ``video`` (PyAV streaming decode), ``prompt`` (the media text and the expansion of
``<|media_pad|>``), ``hashing`` (content hashes for the encoder and prefix caches).

Everything here is blocking CPU work: call it off the event loop.
"""

from kimi_grpc.media.chunk import MediaKind, VisionChunk, pack_pixel_values
from kimi_grpc.media.config import MediaConfig, MediaLimits
from kimi_grpc.media.errors import MediaError
from kimi_grpc.media.hashing import chunk_hash, item_hash
from kimi_grpc.media.image import (
    IMAGE_FORMATS,
    decode_image,
    image_num_tokens,
    image_to_chunk,
    preprocess_image,
)
from kimi_grpc.media.prompt import (
    IMAGE_PROMPT,
    MEDIA_PAD,
    MEDIA_PAD_ID,
    ExpandedPrompt,
    expand_media_pads,
    video_chunk_prompt,
    video_prompt,
)
from kimi_grpc.media.resize import ResizePlan, navit_resize
from kimi_grpc.media.sampling import (
    SamplingPlan,
    plan_sampling,
    sample_frame_indices,
    timestamp_str,
)
from kimi_grpc.media.video import (
    VIDEO_CODECS,
    ProcessedVideo,
    VideoInfo,
    VideoPlan,
    plan_video,
    preprocess_video,
)

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_PROMPT",
    "MEDIA_PAD",
    "MEDIA_PAD_ID",
    "VIDEO_CODECS",
    "ExpandedPrompt",
    "MediaConfig",
    "MediaError",
    "MediaKind",
    "MediaLimits",
    "ProcessedVideo",
    "ResizePlan",
    "SamplingPlan",
    "VideoInfo",
    "VideoPlan",
    "VisionChunk",
    "chunk_hash",
    "decode_image",
    "expand_media_pads",
    "image_num_tokens",
    "image_to_chunk",
    "item_hash",
    "navit_resize",
    "pack_pixel_values",
    "plan_sampling",
    "plan_video",
    "preprocess_image",
    "preprocess_video",
    "sample_frame_indices",
    "timestamp_str",
    "video_chunk_prompt",
    "video_prompt",
]
