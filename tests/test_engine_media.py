"""Images and video through the engine (demo-vl, float32, greedy unless seeded).

Every scenario that changes how a prompt's media positions are computed (chunked prefill cutting a
span, a prefix-cache hit ending before / inside / after one, n > 1, preemption and recompute,
tensor parallelism) must give exactly the tokens of the prompt computed alone in one step without
any cache. The prompts are real chats (PNG images of noise, an H.264 video of two chunks) through
``chat_prompt``, so the spans are the ones the server builds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_media_video import encode_video

from kimi_grpc import LLM, SamplingParams
from kimi_grpc.chat import ChatRenderer
from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.config import EngineConfig
from kimi_grpc.engine.llm_engine import LLMEngine, RequestError
from kimi_grpc.engine.media_encoder import cache_keys
from kimi_grpc.engine.outputs import CompletionOutput, RequestOutput
from kimi_grpc.media import MediaConfig, MediaLimits
from kimi_grpc.media.request import ChatPrompt, MediaSpan, chat_prompt
from kimi_grpc.model import ForwardBatch
from kimi_grpc.model.kv_cache import LatentKVCache
from kimi_grpc.parallel import step_channel
from kimi_grpc.parallel.distributed import ParallelConfig
from kimi_grpc.parallel.executor import RankExecutor
from kimi_grpc.parallel.step_channel import StepSender
from kimi_grpc.parallel.step_codec import (
    Op,
    StepFormatError,
    StepMessage,
    decode,
    decode_header,
    encode,
)

pytestmark = pytest.mark.usefixtures("scheduling_mode")

PAGE = 16  # small pages: several cover each image / video chunk
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
QUESTION = "Look closely at the following picture and describe it:"


@dataclass
class VL:
    """The demo-vl checkpoint loaded once; ``reference`` computes a prompt in one step, no
    prefix cache (the ground truth)."""

    path: Path
    reference: LLM
    renderer: ChatRenderer
    config: MediaConfig
    pad_id: int

    def prompt(self, *parts: dict) -> ChatPrompt:
        messages = [{"role": "user", "content": list(parts)}]
        return chat_prompt(self.renderer, messages, self.config, MediaLimits(), pad_id=self.pad_id)

    def engine(self, **config) -> LLMEngine:
        """A fresh engine (own KV cache, encoder cache, scheduler) on the loaded weights."""
        config = {"kv_cache_memory": 16 << 20, "page_size": PAGE, **config}
        eng = self.reference.engine
        vision = eng.media_encoder.vision
        engine_config = EngineConfig(**config)
        executor = RankExecutor(eng.model, engine_config)
        return LLMEngine(executor, eng.tokenizer, engine_config, vision=vision)

    def alone(self, prompts: list[ChatPrompt], params=GREEDY) -> list[RequestOutput]:
        """Each prompt by itself on the reference engine."""
        return [self.reference.generate(p.token_ids, params, media=p.spans)[0] for p in prompts]


@pytest.fixture(scope="module")
def vl():
    path = demo_checkpoint(preset="demo-vl")
    reference = LLM(
        str(path),
        dtype="float32",
        kv_cache_memory=16 << 20,
        page_size=PAGE,
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
    )
    renderer = ChatRenderer.from_model_dir(path, reference.tokenizer)
    pad_id = reference.engine.model.config.vision_config.media_placeholder_token_id
    return VL(path, reference, renderer, MediaConfig.from_model_dir(path), pad_id)


def png(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """Noise: 160x120 is 30 media tokens."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def mp4(seed: int) -> bytes:
    """4 s at 4 fps of blocky noise scrolling sideways: 8 sampled frames, two chunks of 20
    tokens (128x96) with different content."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = blocks.repeat(16, axis=0).repeat(16, axis=1)
    return encode_video(n=16, fps=4, width=128, height=96, frame=lambda i: np.roll(base, 8 * i, 1))


def image(seed: int) -> dict:
    return {"type": "image", "data": png(seed)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


@pytest.fixture(scope="module")
def prompts(vl) -> dict[str, ChatPrompt]:
    made = {
        "image_a": vl.prompt(text(QUESTION), image(1), text("What is this?")),
        "image_b": vl.prompt(text(QUESTION), image(2), text("What is this?")),
        # Same text and image as image_a, but the text right after the image differs.
        "image_a_colours": vl.prompt(text(QUESTION), image(1), text("Colours?")),
        "video": vl.prompt({"type": "video", "data": mp4(3)}, text("What happens?")),
    }
    assert [len(p.spans) for p in made.values()] == [1, 1, 1, 2]
    return made


@pytest.fixture(scope="module")
def expected(vl, prompts) -> dict[str, RequestOutput]:
    """Every prompt's greedy output alone, computed once."""
    outs = vl.alone(list(prompts.values()))
    by_name = dict(zip(prompts, outs, strict=True))
    # The media matter: another image behind the same text changes the answer.
    assert by_name["image_a"].token_ids != by_name["image_b"].token_ids
    return by_name


def run(engine: LLMEngine, prompts: list[ChatPrompt], params=GREEDY) -> list[RequestOutput]:
    """Submits everything at once and steps to completion (what ``LLM.generate`` does)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids = engine.add_request(f"r{i}", prompt.token_ids, p, media=prompt.spans)
        results[f"r{i}"] = RequestOutput(f"r{i}", ids, [CompletionOutput(j) for j in range(p.n)])
    while engine.has_unfinished_requests():
        for delta in engine.step():
            results[delta.request_id].apply(delta)
    return [results[f"r{i}"] for i in range(len(prompts))]


def spy_media_steps(engine: LLMEngine) -> list[tuple[list, object]]:
    """Records each step's ``(ranges, StepMedia or None)`` from the engine's media encoder."""
    encoder = engine.media_encoder
    real = encoder.step_embeddings
    calls = []

    def step_embeddings(ranges):
        result = real(ranges)
        calls.append((list(ranges), result))
        return result

    encoder.step_embeddings = step_embeddings
    return calls


def chunks_touched(ranges) -> set[bytes]:
    """Content hashes of the chunks whose spans one step's ranges reach into."""
    return {
        span.chunk.content_hash
        for spans, start, n, _ in ranges
        for span in spans
        if span.offset < start + n and start < span.end
    }


def assert_same(outs: list[RequestOutput], refs: list[RequestOutput]) -> None:
    """Same tokens, and the same logprobs up to float32 reassociation noise."""
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    for out, ref in zip(outs, refs, strict=True):
        got = [lp for lp, _ in out.outputs[0].logprobs]
        want = [lp for lp, _ in ref.outputs[0].logprobs]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


# --- chunked prefill ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_cache_tokens", [16_384, 0], ids=["cached", "no-cache"])
def test_chunked_prefill_cutting_spans_matches_one_step(
    vl, prompts, expected, encoder_cache_tokens
):
    """A 16-token budget cuts the 30-token image span and both 20-token video chunks across
    steps (the two prompts sharing steps); each step splices exactly its positions' rows.
    Every distinct chunk is encoded once however many steps it spans, with or without the
    encoder cache (a sequence holds the chunk it stopped inside)."""
    names = ["image_a", "video"]
    batch = [prompts[n] for n in names]
    engine = vl.engine(
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
        encoder_cache_tokens=encoder_cache_tokens,
    )
    steps = spy_media_steps(engine)
    assert_same(run(engine, batch), [expected[n] for n in names])

    spans = [span for p in batch for span in p.spans]
    assert all(span.chunk.num_tokens > 16 for span in spans)
    for span in spans:  # each span computed over >= 2 steps, each step a part of it
        parts = [
            (max(start, span.offset), min(start + n, span.end))
            for ranges, _ in steps
            for spans_, start, n, _ in ranges
            if span in spans_ and span.offset < start + n and start < span.end
        ]
        assert len(parts) >= 2
        assert sorted(parts)[0][0] == span.offset and sorted(parts)[-1][1] == span.end
        assert sum(hi - lo for lo, hi in parts) == span.chunk.num_tokens
    # Every media position spliced exactly once over the whole run.
    rows = sum(len(media.rows) for _, media in steps if media is not None)
    assert rows == sum(span.chunk.num_tokens for span in spans)

    touched = [chunks_touched(ranges) for ranges, _ in steps]
    distinct = {span.chunk.content_hash for span in spans}
    assert set().union(*touched) == distinct and len(distinct) == 3
    # Each distinct chunk is encoded once however many steps it spans: the sequence holds the
    # chunk it stopped inside, so this holds even with no encoder cache at all.
    assert engine.media_encoder.encoded_chunks == 3 < sum(map(len, touched))
    if encoder_cache_tokens:
        assert engine.media_encoder.cache.hits == 0  # every later step found its hold
    else:
        assert len(engine.media_encoder.cache) == 0


# --- prefix cache ------------------------------------------------------------------------------


def test_prefix_cache_keys_media_by_content(vl, prompts, expected):
    """Pages are keyed by the image's content: another image behind the same text hits only the
    pages before the span; the same image hits past it; the same image with other text after it
    hits up to a page boundary inside the span (the page it diverges in is continued by the first
    request's answer, so it is not taken over), so its prefill resumes mid-chunk. Every output
    equals the uncached one."""
    engine = vl.engine(max_num_batched_tokens=512)
    names = ["image_a", "image_b", "image_a", "image_a_colours"]
    outs = [run(engine, [prompts[n]])[0] for n in names]
    assert_same(outs, [expected[n] for n in names])

    span = prompts["image_a"].spans[0]
    assert span.offset >= PAGE  # at least one all-text page before the image
    first, other_image, same_image, other_text = (o.num_cached_tokens for o in outs)
    assert first == 0
    assert other_image == span.offset // PAGE * PAGE > 0
    # The same prompt again: all but its last token, the partly filled last page included
    # (taken over from the first request: a partial hit).
    assert same_image == len(prompts["image_a"].token_ids) - 1 > span.end
    a, colours = prompts["image_a"].token_ids, prompts["image_a_colours"].token_ids
    diverge = next(i for i, (x, y) in enumerate(zip(a, colours, strict=False)) if x != y)
    assert diverge >= span.end  # the prompts differ only after the image
    assert other_text == diverge // PAGE * PAGE
    assert span.offset < other_text < span.end
    # Token ids alone cannot tell the images apart; the content keys can.
    assert prompts["image_a"].token_ids == prompts["image_b"].token_ids


# --- n > 1 -------------------------------------------------------------------------------------


def test_n_completions_with_media_equal_single_ones(vl, prompts, expected):
    """n=2 shares the request's spans: greedy completions both equal the n=1 output, seeded ones
    equal n=1 runs with seed + index; the image is encoded once for both."""
    prompt = prompts["image_a"]
    engine = vl.engine(max_num_batched_tokens=16)
    greedy = SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True)
    out = run(engine, [prompt], greedy)[0]
    assert [c.token_ids for c in out.outputs] == [expected["image_a"].token_ids] * 2
    assert engine.media_encoder.encoded_chunks == 1

    seeded = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    engine = vl.engine(max_num_batched_tokens=16)
    out = run(engine, [prompt], SamplingParams(n=2, seed=11, **seeded))[0]
    singles = [
        vl.alone([prompt], SamplingParams(seed=seed, **seeded))[0].token_ids for seed in (11, 12)
    ]
    assert [c.token_ids for c in out.outputs] == singles
    assert singles[0] != singles[1]


# --- preemption --------------------------------------------------------------------------------


PREEMPTED = ["image_a", "image_b", "video", "image_a_colours"]
LONGER = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def expected_longer(vl, prompts) -> list[list[int]]:
    return [o.token_ids for o in vl.alone([prompts[n] for n in PREEMPTED], LONGER)]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preempted_media_requests_recompute_to_the_same_tokens(
    vl, prompts, expected_longer, prefix_caching
):
    """10 pages (160 tokens) for four 75-85-token prompts growing by 16 tokens: the newest running
    sequence is preempted and later recomputed, without the prefix cache from position 0 (its
    media spliced again); every output equals the prompt's alone."""
    token_bytes = LatentKVCache.bytes_per_token(vl.reference.engine.model.config, torch.float32)
    engine = vl.engine(
        max_num_batched_tokens=64,
        kv_cache_memory=10 * PAGE * token_bytes,
        enable_prefix_caching=prefix_caching,
    )
    assert engine.blocks.num_pages == 10
    recomputed = []  # (request, start, n): media positions computed again after a preemption
    prepare = engine.runner.prepare

    def spy(scheduled):
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            if seq.num_preemptions and any(
                s.offset < start + n and start < s.end for s in seq.media
            ):
                recomputed.append((seq.request_id, start, n))
        return prepare(scheduled)

    engine.runner.prepare = spy
    outs = run(engine, [prompts[n] for n in PREEMPTED], LONGER)
    assert engine.stats().num_preemptions > 0
    if not prefix_caching:
        assert recomputed and recomputed[0][1] == 0
    assert [o.token_ids for o in outs] == expected_longer
    assert engine.blocks.num_free_pages == engine.blocks.num_pages


# --- tensor parallelism ------------------------------------------------------------------------


def test_tensor_parallel_media_matches_single_process(vl, prompts, expected):
    """TP=2 (a real worker process, gloo): rank 0 encodes, the step codec carries the media rows
    and the embeddings are broadcast inside the forward. Small steps cut the spans and put media
    rows next to a decode; the tokens equal TP=1's."""
    names = ["image_a", "video"]
    batch = [prompts[n] for n in names]
    # A short collective timeout: ranks out of step fail the test in seconds, not a minute.
    with LLM(
        str(vl.path),
        parallel=ParallelConfig(2, collective_timeout=15.0),
        dtype="float32",
        kv_cache_memory=16 << 20,
        page_size=PAGE,
        max_num_batched_tokens=16,
    ) as llm:
        steps = spy_media_steps(llm.engine)
        outs = llm.generate([p.token_ids for p in batch], GREEDY, media=[p.spans for p in batch])
        again = llm.generate(batch[0].token_ids, GREEDY, media=batch[0].spans)[0]
    assert_same(outs, [expected[n] for n in names])
    assert_same([again], [expected["image_a"]])
    assert again.num_cached_tokens > batch[0].spans[0].end  # the rerun's prefix hit under TP
    with_rows = [ranges for ranges, media in steps if media is not None]
    assert len(with_rows) >= 4
    prompt_lens = {id(p.spans[0]): len(p.token_ids) for p in batch}
    assert any(  # a step splicing media while the other sequence decodes
        any(n == 1 and start >= prompt_lens[id(spans[0])] for spans, start, n, _ in ranges)
        for ranges in with_rows
    )


def test_step_codec_carries_media_rows():
    msg = StepMessage(
        Op.STEP,
        seq=3,
        token_ids=[[1, 2, 3], [9]],
        context_lens=[3, 40],
        block_tables=[[0], [1, 2, 3]],
        page_size=16,
        media_rows=[1, 2],
    )
    header, payload = encode(msg)
    assert decode_header(header).num_media_rows == 2
    assert decode(decode_header(header), payload) == msg
    bad = payload.clone()
    bad[-1] = 4  # only 4 tokens in the step: row 4 does not exist
    with pytest.raises(StepFormatError, match="media rows"):
        decode(decode_header(header), bad)


def test_step_sender_sends_the_batch_media_rows(monkeypatch):
    """What rank 0 puts on the wire for a step with media: the workers must learn the rows, or
    they skip the embeddings' broadcast and the ranks' collectives fall out of step."""
    sent = []
    monkeypatch.setattr(step_channel.dist, "broadcast", lambda t, **kw: sent.append(t.clone()))
    sender = StepSender(None, heartbeat_interval=3600.0, on_failure=pytest.fail)
    try:
        batch = ForwardBatch.build([[5, 6, 7], [8]], [3, 20], [[0], [1, 2]], 16, "cpu", [1, 2])
        with sender.step(batch):
            pass
    finally:
        sender.shutdown()
    msg = decode(decode_header(sent[0]), sent[1])
    assert msg.token_ids == [[5, 6, 7], [8]] and msg.media_rows == [1, 2]


# --- validation --------------------------------------------------------------------------------


def test_text_only_checkpoint_refuses_media(prompts):
    prompt = prompts["image_a"]
    with LLM(demo_checkpoint(), dtype="float32", kv_cache_memory=8 << 20) as text_only:
        engine = text_only.engine
        assert engine.media_encoder is None
        with pytest.raises(RequestError, match="no vision tower") as err:
            engine.add_request("r", prompt.token_ids, GREEDY, media=prompt.spans)
        assert err.value.field == "media"
        assert not engine.has_unfinished_requests()
        engine.add_request("r", prompt.token_ids, GREEDY)  # the same ids as text are fine


def test_bad_spans_are_refused(vl, prompts):
    prompt = prompts["image_a"]
    ids, (span,) = prompt.token_ids, prompt.spans
    chunk = span.chunk
    video, (first, second) = prompts["video"].token_ids, prompts["video"].spans
    engine = vl.engine()
    leaves, off_pads = "overlaps or leaves the prompt", "does not cover media pad tokens"
    bad = [
        (ids, [MediaSpan(len(ids) - 5, chunk)], leaves),  # past the end
        (ids, [MediaSpan(-1, chunk)], leaves),
        (ids, [MediaSpan(span.offset - 1, chunk)], off_pads),  # one position early
        (ids, [MediaSpan(0, chunk)], off_pads),  # on text
        # Each span valid alone, together not: the same chunk twice, and the two out of order.
        (video, [first, first], leaves),
        (video, [second, first], leaves),
        # A pad no span covers before the last span (a video chunk left out) would keep a text
        # embedding.
        (video, [second], "media pad tokens but the spans cover"),
    ]
    for prompt_ids, spans, why in bad:
        with pytest.raises(RequestError, match=why) as err:
            engine.add_request("r", prompt_ids, GREEDY, media=spans)
        assert err.value.field == "media"
        assert not engine.has_unfinished_requests()
    assert run(engine, [prompt])[0].finish_reason == "length"
    # Past the last span a pad is an ordinary token: a multi-phase AgentStep re-runs prompt +
    # generated, and the model may have sampled the pad id.
    engine.add_request("phase-2", [*ids, 5, vl.pad_id, 7], GREEDY, media=[span])
    engine.abort_request("phase-2")


# --- cache keys --------------------------------------------------------------------------------


def test_cache_keys(vl):
    """Media positions get negative keys from the chunk's content (never a token id), distinct
    along the chunk and independent of where it sits; text positions keep their ids."""
    a = vl.prompt(text(QUESTION), image(1), text("What is this?"))
    a_again = vl.prompt(text(QUESTION), image(1), text("What is this?"))
    b = vl.prompt(text(QUESTION), image(2), text("What is this?"))
    assert a.spans[0].chunk is not a_again.spans[0].chunk  # preprocessed twice
    (span,) = a.spans
    media = range(span.offset, span.end)
    keys = cache_keys(a.token_ids, a.spans)

    assert a.token_ids[span.offset] == vl.pad_id  # the input is left as it was
    assert all(keys[p] < 0 for p in media)
    assert len({keys[p] for p in media}) == span.chunk.num_tokens
    outside = [p for p in range(len(keys)) if p not in media]
    assert [keys[p] for p in outside] == [a.token_ids[p] for p in outside]

    assert cache_keys(a_again.token_ids, a_again.spans) == keys
    other = cache_keys(b.token_ids, b.spans)
    assert all(other[p] != keys[p] for p in media)
    assert [other[p] for p in outside] == [keys[p] for p in outside]

    # The same chunk two positions later: the same key sequence, shifted.
    shifted = cache_keys([7, 7, *a.token_ids], [MediaSpan(span.offset + 2, span.chunk)])
    assert shifted[span.offset + 2 : span.end + 2] == [keys[p] for p in media]
    assert cache_keys(a.token_ids, []) == a.token_ids
