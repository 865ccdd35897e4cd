"""Greedy generation with an image and with a video against transformers' Kimi K2.5/K2.6 port
(``Kimi_K25ForConditionalGeneration``), float32.

One checkpoint written by our maker in Moonshot's layout (``demo-vl``: INT4 routed experts, bf16
tower) is loaded whole by both sides: by our ``LLM`` (engine, paged KV cache, encoder cache,
embeddings spliced per step) and by transformers through its own weight conversion and
compressed-tensors dequantization (tests/hf_vision_reference.build_hf_model). The prompt is our
serving path's (``chat_prompt``: preprocessing, chat template, video timestamps, pads expanded);
transformers gets the same ``input_ids`` and the same pixel values / ``image_grid_thw`` (every
chunk in prompt order, ``pack_pixel_values``) and scatters the vision embeddings into the
``<|media_pad|>`` positions itself. Its greedy tokens come from a plain argmax loop over full
forwards (no KV cache, the tower re-run each step), so nothing of its generation machinery is
trusted either.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Kimi_K25ForConditionalGeneration

from kimi_grpc.chat import ChatRenderer
from kimi_grpc.checkpoint_maker import make_checkpoint
from kimi_grpc.engine.llm import LLM
from kimi_grpc.media import MediaConfig, MediaLimits
from kimi_grpc.media.chunk import pack_pixel_values
from kimi_grpc.media.request import ChatPrompt, chat_prompt
from kimi_grpc.sampling_params import SamplingParams
from tests.hf_vision_reference import build_hf_model

MAX_TOKENS = 16
LOGPROB_TOLERANCE = 2e-4  # absolute (float32; observed <= 4e-5)
# Every reference step's top-1 logit leads the runner-up by at least this (25x the tolerance),
# so equal tokens are a decisive comparison, not the luck of a near-tie (seed 2: >= 0.0117).
MIN_MARGIN = 5e-3
SEED = 2
ENGINE_ARGS = dict(dtype="float32", kv_cache_memory=16 << 20, page_size=16, guided_decoding=False)


def png_bytes() -> bytes:
    """A 120x90 noise image (resized to an 8x10 patch grid: 20 tokens)."""
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def mp4_bytes(n: int = 30, fps: int = 10, width: int = 96, height: int = 64) -> bytes:
    """3 s at 10 fps (sampled at 2 fps: 6 frames, chunks of 4 + 2): an orange block sliding
    over a horizontal gradient."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            img = np.zeros((height, width, 3), np.uint8)
            img[:, :, 2] = (np.arange(width) * 2).astype(np.uint8)[None, :]
            x = 3 * i % (width - 16)
            img[20:40, x : x + 16] = (255, 80, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


MESSAGES = {
    "image": [
        {
            "role": "user",
            "content": [
                {"type": "image", "data": png_bytes()},
                {"type": "text", "text": "What is in this image?"},
            ],
        }
    ],
    "video": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe the video."},
                {"type": "video", "data": mp4_bytes()},
            ],
        }
    ],
}


class Setup(NamedTuple):
    path: Path
    llm: LLM
    hf: Kimi_K25ForConditionalGeneration
    loading_info: dict
    prompts: dict[str, ChatPrompt]


class Reference(NamedTuple):
    tokens: list[int]
    logprobs: list[float]  # of each chosen token
    margins: list[float]  # top-1 minus top-2 logit at each step


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    path = make_checkpoint(
        tmp_path_factory.mktemp("demo-vl"), "demo-vl", seed=SEED, max_shard_bytes=256 * 1024
    )
    hf, info = build_hf_model(path, tmp_path_factory.mktemp("hf-demo-vl"))
    llm = LLM(str(path), **ENGINE_ARGS)
    renderer = ChatRenderer.from_model_dir(path, llm.tokenizer)
    media_config = MediaConfig.from_model_dir(path)
    pad_id = llm.engine.model.config.vision_config.media_placeholder_token_id
    prompts = {
        kind: chat_prompt(renderer, messages, media_config, MediaLimits(), pad_id=pad_id)
        for kind, messages in MESSAGES.items()
    }
    yield Setup(path, llm, hf, info, prompts)
    llm.shutdown()


def hf_greedy(
    hf: Kimi_K25ForConditionalGeneration,
    prompt: ChatPrompt,
    n: int = MAX_TOKENS,
    pixel_values: torch.Tensor | None = None,
) -> Reference:
    """transformers' greedy continuation: ``n`` full forwards, argmax of the last position."""
    chunks = [chunk for item in prompt.media for chunk in item.chunks]
    packed, grid_thw = pack_pixel_values(chunks)
    pixel_values = packed if pixel_values is None else pixel_values
    ids = list(prompt.token_ids)
    tokens, logprobs, margins = [], [], []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(
                input_ids=torch.tensor([ids]),
                pixel_values=pixel_values,
                image_grid_thw=grid_thw,
                use_cache=False,
            ).logits[0, -1]
            top2 = logits.topk(2).values
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(logits.log_softmax(-1)[token]))
            margins.append(float(top2[0] - top2[1]))
            ids.append(token)
    return Reference(tokens, logprobs, margins)


@pytest.fixture(scope="module")
def references(setup) -> dict[str, Reference]:
    return {kind: hf_greedy(setup.hf, prompt) for kind, prompt in setup.prompts.items()}


def greedy(n: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)


def test_transformers_loads_the_whole_checkpoint(setup):
    """The reference is the checkpoint as transformers reads it: every tensor consumed, none of
    its parameters left at their random init, all float32 (experts dequantized)."""
    info = setup.loading_info
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    params = dict(setup.hf.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    experts = params["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    assert experts.shape[0] == setup.llm.engine.model.config.n_routed_experts


def test_prompts_exercise_images_and_video_chunks(setup):
    image, video = setup.prompts["image"], setup.prompts["video"]
    pad_id = setup.hf.config.image_token_id
    assert [span.chunk.kind for span in image.spans] == ["image"]
    assert [span.chunk.grid_thw[0] for span in image.spans] == [1]
    # The video: frames 0, 6, 12, 17 | 23, 29 of 30 -- a 4-frame chunk and a 2-frame tail, each
    # behind its own timestamp (frame 23 at 10 fps; truncated, as in tests/test_media_video).
    assert [span.chunk.frame_indices for span in video.spans] == [(0, 6, 12, 17), (23, 29)]
    assert [span.chunk.grid_thw[0] for span in video.spans] == [4, 2]
    assert [span.chunk.timestamp for span in video.spans] == ["00:00:00.000", "00:00:02.299"]
    text = setup.llm.tokenizer.decode(video.rendered.token_ids)
    assert text.count("<|media_begin|>video<|media_content|><|media_pad|><|media_end|>") == 2
    assert text.index("00:00:00.000") < text.index("00:00:02.299") < text.index("<|im_end|>")
    for prompt in (image, video):
        # transformers finds the media positions by the id alone: exactly the spans' positions.
        positions = [i for i, t in enumerate(prompt.token_ids) if t == pad_id]
        assert positions == [i for s in prompt.spans for i in range(s.offset, s.end)]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_greedy_tokens_match_transformers(setup, references, kind):
    prompt, reference = setup.prompts[kind], references[kind]
    assert min(reference.margins) >= MIN_MARGIN, "a near-tie in the reference: not decisive"
    out = setup.llm.generate(prompt.token_ids, greedy(), media=prompt.spans)[0].outputs[0]
    assert out.token_ids == reference.tokens
    assert len(out.token_ids) == MAX_TOKENS
    # ... and the distributions they were drawn from agree (the chosen tokens' log-probs).
    logprobs = [logprob for logprob, _ in out.logprobs]
    assert np.allclose(logprobs, reference.logprobs, rtol=0, atol=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_pixels_steer_the_reference(setup, references, kind):
    """Not vacuous: with every pixel mid-grey (0.0 after normalisation) instead, transformers
    continues differently, so the equality above depends on the vision embeddings."""
    prompt = setup.prompts[kind]
    packed, _ = pack_pixel_values([c for item in prompt.media for c in item.chunks])
    grey = hf_greedy(setup.hf, prompt, n=4, pixel_values=torch.zeros_like(packed))
    assert grey.tokens != references[kind].tokens[:4]


def test_chunked_prefill_batch_matches_transformers(setup, references):
    """Both prompts in one batch on an engine that prefills 16 tokens per step: spans are cut
    across steps and two requests' media share the encoder batch."""
    llm = LLM(str(setup.path), max_num_batched_tokens=16, **ENGINE_ARGS)
    try:
        prompts = [setup.prompts["image"], setup.prompts["video"]]
        assert max(s.chunk.num_tokens for p in prompts for s in p.spans) > 16
        outs = llm.generate(
            [p.token_ids for p in prompts], greedy(), media=[p.spans for p in prompts]
        )
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [
        references["image"].tokens,
        references["video"].tokens,
    ]
