"""Native CPU kernels (``kimi_grpc._C``) of the INT4 MoE experts and MLA decode vs the reference."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_grpc import ops
from kimi_grpc.checkpoint_maker import PRESETS
from kimi_grpc.int4 import pack_int4
from kimi_grpc.ops import reference

_C = pytest.importorskip("kimi_grpc._C")
if not (hasattr(_C, "int4_moe_experts_cpu") and hasattr(_C, "mla_decode_cpu")):
    pytest.skip("kimi_grpc._C lacks the native CPU MoE / MLA ops", allow_module_level=True)

DEMO = PRESETS["demo"]
DEMO_H, DEMO_I = DEMO["hidden_size"], DEMO["moe_intermediate_size"]  # 128, 32
DEMO_RANK, DEMO_D = DEMO["kv_lora_rank"], DEMO["kv_lora_rank"] + DEMO["qk_rope_head_dim"]


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend("auto")


def moe_weights(gen, experts, hidden, inter, group_size):
    """Random packed INT4 experts: (w13_packed, w13_scale, w2_packed, w2_scale)."""

    def one(rows, cols):
        q = torch.randint(-8, 8, (experts, rows, cols), generator=gen)
        scale = torch.rand(experts, rows, cols // group_size, generator=gen) * 0.05 + 0.005
        return pack_int4(q), scale.to(torch.bfloat16)

    return (*one(2 * inter, hidden), *one(hidden, inter))


def routing(gen, tokens, experts, top_k, only=None):
    if only is not None:  # every token on expert `only` (plus distinct others when top_k > 1)
        rest = [e for e in range(experts) if e != only]
        ids = [
            [only, *[rest[i] for i in torch.randperm(len(rest), generator=gen)[: top_k - 1]]]
            for _ in range(tokens)
        ]
        ids = torch.tensor(ids, dtype=torch.int32).reshape(tokens, top_k)
    else:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return weights / weights.sum(-1, keepdim=True) * 2.5, ids.to(torch.int32).reshape(tokens, top_k)


def assert_close_scaled(actual, expected, rel):
    assert torch.isfinite(actual).all()
    scale = expected.float().abs().max().item() + 1e-6
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


MOE_CASES = [  # (tokens, experts, top_k, hidden, inter, group_size, only)
    (1, 16, 8, DEMO_H, DEMO_I, 32, None),
    (1, 384, 8, DEMO_H, DEMO_I, 32, None),
    (8, 384, 8, DEMO_H, DEMO_I, 32, None),
    (64, 64, 8, DEMO_H, DEMO_I, 32, None),
    (5, 16, 8, DEMO_H, DEMO_I, 32, 3),  # all tokens on expert 3
    (7, 1, 1, DEMO_H, DEMO_I, 32, 0),  # a single expert
    (3, 4, 2, 64, 32, 32, None),
    (2, 16, 8, 256, 64, 64, None),
    (33, 16, 8, 512, 128, 32, None),  # small k2-like widths
    (4, 8, 8, 1024, 256, 32, None),
    (1, 8, 2, 7168 // 8, 2048 // 8, 32, None),
]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "gs", "only"), MOE_CASES)
def test_int4_moe_matches_reference(tokens, experts, top_k, hidden, inter, gs, only):
    gen = torch.Generator().manual_seed(tokens * 1000 + experts + hidden)
    w = moe_weights(gen, experts, hidden, inter, gs)
    topk_weights, topk_ids = routing(gen, tokens, experts, top_k, only)
    x = torch.randn(tokens, hidden, generator=gen)
    got = _C.int4_moe_experts_cpu(x, *w, topk_weights, topk_ids, gs)
    want = reference.int4_moe_experts(x, *w, topk_weights, topk_ids, gs)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_close_scaled(got, want, 1e-5)
    # bf16 activations: native math is fp32, the reference's is bf16; compare to both.
    xb = x.bfloat16()
    got_b = _C.int4_moe_experts_cpu(xb, *w, topk_weights, topk_ids, gs)
    assert got_b.dtype == torch.bfloat16
    assert_close_scaled(
        got_b, reference.int4_moe_experts(xb.float(), *w, topk_weights, topk_ids, gs), 1e-2
    )
    assert_close_scaled(got_b, reference.int4_moe_experts(xb, *w, topk_weights, topk_ids, gs), 5e-2)


def test_int4_moe_unused_experts_and_empty_batch():
    gen = torch.Generator().manual_seed(7)
    w = moe_weights(gen, 16, DEMO_H, DEMO_I, 32)
    # Expert ids only from {2, 9}: the other 14 get no tokens.
    ids = torch.tensor([[2, 9], [9, 2], [2, 9]], dtype=torch.int32)
    tw = torch.rand(3, 2, generator=gen)
    x = torch.randn(3, DEMO_H, generator=gen)
    assert_close_scaled(
        _C.int4_moe_experts_cpu(x, *w, tw, ids, 32),
        reference.int4_moe_experts(x, *w, tw, ids, 32),
        1e-5,
    )
    empty = _C.int4_moe_experts_cpu(x[:0], *w, tw[:0], ids[:0], 32)
    assert empty.shape == (0, DEMO_H)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_int4_moe_negative_ids_are_skipped(backend):
    # Expert parallelism: rank r holds experts [r*E/2, (r+1)*E/2) and passes -1 for the others;
    # the two ranks' partial outputs sum to the single-rank output.
    gen = torch.Generator().manual_seed(11)
    experts, half = 16, 8
    w = moe_weights(gen, experts, DEMO_H, DEMO_I, 32)
    tw, ids = routing(gen, 9, experts, 8)
    x = torch.randn(9, DEMO_H, generator=gen)
    ops.set_backend(backend)
    full = ops.int4_moe_experts(x, *w, tw, ids, group_size=32)
    parts = []
    for rank in range(2):
        lo = rank * half
        local = torch.where((ids >= lo) & (ids < lo + half), ids - lo, -1).to(torch.int32)
        shard = [t[lo : lo + half] for t in w]
        parts.append(ops.int4_moe_experts(x, *shard, tw, local, group_size=32))
    assert_close_scaled(parts[0] + parts[1], full, 1e-5)
    nothing = torch.full_like(ids, -1)
    assert torch.equal(ops.int4_moe_experts(x, *w, tw, nothing, group_size=32), torch.zeros_like(x))


def test_int4_moe_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    w = moe_weights(gen, 16, DEMO_H, DEMO_I, 32)
    tw, ids = routing(gen, 6, 16, 8)
    x = torch.randn(DEMO_H, 6, generator=gen).t()
    assert_close_scaled(
        _C.int4_moe_experts_cpu(x, *w, tw, ids, 32),
        reference.int4_moe_experts(x, *w, tw, ids, 32),
        1e-5,
    )


def test_int4_moe_bad_arguments():
    gen = torch.Generator().manual_seed(9)
    w13, s13, w2, s2 = moe_weights(gen, 4, 64, 32, 32)
    tw, ids = routing(gen, 2, 4, 2)
    x = torch.randn(2, 64)
    good = (x, w13, s13, w2, s2, tw, ids, 32)

    def call(**over):
        args = list(good)
        names = ["x", "w13", "s13", "w2", "s2", "tw", "ids", "gs"]
        for k, v in over.items():
            args[names.index(k)] = v
        return _C.int4_moe_experts_cpu(*args)

    bad = [
        ({"x": x.half()}, "x must be a 2-D float32 or bfloat16"),
        ({"w13": w13.float()}, "must be int32"),
        ({"s13": s13.float()}, "must be bfloat16"),
        ({"ids": ids.long()}, "topk_ids int32"),
        ({"gs": 24}, "group_size 24"),
        ({"gs": 64}, "group_size 64"),
        ({"x": torch.randn(2, 60)}, "hidden size 60"),
        ({"x": torch.randn(2, 128)}, "w13_packed must be [E, 2I, H/8]"),
        ({"s2": s2[:, :, :0]}, "w2_scale must be"),
        ({"ids": torch.tensor([[0, 4], [1, 2]], dtype=torch.int32)}, "must be < 4"),
        ({"tw": tw[:, :1]}, "[T, k]"),
    ]
    for over, message in bad:
        with pytest.raises(RuntimeError, match=_re(message)):
            call(**over)


def _re(text):
    import re

    return re.escape(text)


def paged(gen, lens, page_size, dim, dtype=torch.float32, spare=3):
    """Random paged cache holding sequences of `lens` on shuffled, non-contiguous pages."""
    pages_per = [(n + page_size - 1) // page_size for n in lens]
    num_pages = 2 * sum(pages_per) + spare
    kv = torch.randn(num_pages, page_size, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(lens), max(pages_per) + 1), -1, dtype=torch.int32)  # unused = -1
    at = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = perm[at : at + 2 * n : 2]  # every other page: gaps between them
        at += 2 * n
    return kv, table, torch.tensor(lens, dtype=torch.int32)


MLA_CASES = [  # (lens, heads, dim, rank, page_size)
    ([1], 8, 576, 512, 64),
    ([63], 8, 576, 512, 64),
    ([64], 8, 576, 512, 64),
    ([65], 8, 576, 512, 64),
    ([200], 8, 576, 512, 64),
    ([1, 63, 64, 65, 200], 8, 576, 512, 64),
    ([4096], 8, 576, 512, 64),
    ([777, 3, 1500], 8, 576, 512, 64),
    ([1, 65, 200], DEMO["num_attention_heads"], DEMO_D, DEMO_RANK, 64),
    ([5, 130, 9], 4, 80, 64, 16),
    ([300] * 9, 2, 48, 32, 64),
]


@pytest.mark.parametrize(("lens", "heads", "dim", "rank", "page_size"), MLA_CASES)
def test_mla_decode_matches_reference(lens, heads, dim, rank, page_size):
    gen = torch.Generator().manual_seed(sum(lens) + dim)
    kv, table, seq_lens = paged(gen, lens, page_size, dim)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    scale = 1.0 / math.sqrt(192)
    out, lse = _C.mla_decode_cpu(q, kv, table, seq_lens, scale, rank)
    ref_out, ref_lse = reference.mla_decode(q, kv, table.clamp(min=0), seq_lens, scale, rank)
    assert out.shape == (len(lens), heads, rank) and out.dtype == torch.float32
    assert lse.shape == (len(lens), heads) and lse.dtype == torch.float32
    assert_close_scaled(out, ref_out, 1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # bf16 query and cache: fp32 math on the same (bf16-rounded) values.
    qb, kvb = q.bfloat16(), kv.bfloat16()
    out_b, lse_b = _C.mla_decode_cpu(qb, kvb, table, seq_lens, scale, rank)
    ref_b, ref_lse_b = reference.mla_decode(
        qb.float(), kvb.float(), table.clamp(min=0), seq_lens, scale, rank
    )
    assert out_b.dtype == torch.bfloat16 and lse_b.dtype == torch.float32
    assert_close_scaled(out_b, ref_b, 1e-2)
    torch.testing.assert_close(lse_b, ref_lse_b, rtol=1e-5, atol=1e-4)


def test_mla_decode_large_scores_are_stable():
    gen = torch.Generator().manual_seed(3)
    kv, table, seq_lens = paged(gen, [100, 700], 64, 80)
    q = 30 * torch.randn(2, 4, 80, generator=gen)
    out, lse = _C.mla_decode_cpu(q, kv, table, seq_lens, 1.0, 64)
    ref_out, ref_lse = reference.mla_decode(q, kv, table.clamp(min=0), seq_lens, 1.0, 64)
    assert_close_scaled(out, ref_out, 1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-3)


def test_mla_decode_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    kv, table, seq_lens = paged(gen, [10, 70], 64, 80)
    q = torch.randn(2, 4, 80)
    good = (q, kv, table, seq_lens, 0.1, 64)
    bad = [
        ((q.half(), *good[1:]), "q must be a 3-D float32 or bfloat16"),
        ((q, kv.bfloat16(), *good[2:]), "kv_cache must be"),
        ((q, kv[..., :72], *good[2:]), "kv_cache must be"),
        ((*good[:2], table.long(), *good[3:]), "block_table must be int32"),
        ((*good[:3], seq_lens.long(), *good[4:]), "seq_lens must be int32"),
        ((*good[:3], torch.tensor([10, 0], dtype=torch.int32), *good[4:]), "seq_lens[1]=0"),
        ((*good[:3], torch.tensor([10, 64 * 9], dtype=torch.int32), *good[4:]), "seq_lens[1]=576"),
        ((*good[:5], 81), "kv_lora_rank 81"),
        ((q, kv, torch.full_like(table, kv.shape[0]), *good[3:]), "is not a page id"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=_re(message)):
            _C.mla_decode_cpu(*args)


def test_demo_llm_greedy_native_equals_reference():
    from kimi_grpc.engine.llm import LLM
    from kimi_grpc.sampling_params import SamplingParams

    llm = LLM()
    prompts = ["Hello, my name is", "The capital of France is a city where"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for backend in ("reference", "native"):
        ops.set_backend(backend)
        results[backend] = [out.token_ids for out in llm.generate(prompts, params)]
    assert ops.native_available("int4_moe_experts", "cpu")
    assert ops.native_available("mla_decode", "cpu")
    assert results["native"] == results["reference"]


@pytest.mark.parametrize(("rows", "vocab", "words"), [(1, 2048, 64), (5, 1000, 32), (3, 100, 2)])
def test_apply_token_bitmask_matches_reference(rows, vocab, words):
    """Random words mixed with all-clear and all-set ones; ids past 32 * words are banned."""
    gen = torch.Generator().manual_seed(rows * vocab)
    bits = torch.randint(-(2**31), 2**31, (rows, words), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32)
    bits[:, ::3] = 0
    bits[:, 1::3] = -1
    logits = torch.randn(rows, vocab, generator=gen)
    logits[:, 7::11] = float("nan")  # a banned NaN must become -inf too
    want = reference.apply_token_bitmask_(logits.clone(), bits)
    got = logits.clone()
    _C.apply_token_bitmask_cpu(got, bits)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(got[:, 32 * words :]).all()
    ops.set_backend("native")
    torch.testing.assert_close(
        ops.apply_token_bitmask_(logits.clone(), bits), want, rtol=0, atol=0, equal_nan=True
    )


def test_apply_token_bitmask_rejects_bad_arguments():
    logits = torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match="int32"):
        _C.apply_token_bitmask_cpu(logits, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="rows"):
        _C.apply_token_bitmask_cpu(logits, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="float32"):
        _C.apply_token_bitmask_cpu(logits.double(), torch.zeros(2, 2, dtype=torch.int32))
