"""CUDA kernels against their PyTorch references (run by scripts/gpu_check.sh on a GPU machine;
skipped where no CUDA device exists). Fresh random inputs per case; outputs are new tensors, so
nothing stale can pass for a result."""

from __future__ import annotations

import pytest
import torch

from kimi_grpc.int4 import pack_int4
from kimi_grpc.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _native(name: str):
    from kimi_grpc import _C

    fn = getattr(_C, f"{name}_cuda", None)
    if fn is None:
        pytest.fail(f"kimi_grpc._C was built without {name}_cuda (not a CUDA build?)")
    return fn


# (tokens, experts, top_k, n_group, topk_group): Kimi K2.6 (384, top-8, no groups), DeepSeek-V3
# groups (256 experts, 8 groups, 4 kept), a single token, many tokens, tiny expert counts.
ROUTE_CASES = [
    (1, 384, 8, 1, 1),
    (7, 384, 8, 1, 1),
    (256, 384, 8, 1, 1),
    (4096, 384, 8, 1, 1),
    (33, 256, 8, 8, 4),
    (5, 16, 2, 4, 2),
    (3, 8, 8, 1, 1),
]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "n_group", "topk_group"), ROUTE_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_moe_route_matches_reference(tokens, experts, top_k, n_group, topk_group, with_bias):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 1000 + experts)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen) * 3
    bias = (torch.randn(experts, device="cuda", generator=gen) * 0.1) if with_bias else None
    want_w, want_ids = reference.moe_route(logits, bias, top_k, n_group, topk_group, True, 2.827)
    empty = logits.new_empty(0)
    got_w, got_ids = _native("moe_route")(
        logits, bias if bias is not None else empty, top_k, n_group, topk_group, True, 2.827
    )
    torch.cuda.synchronize()
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_moe_route_ties_go_to_the_lower_index():
    logits = torch.zeros(4, 64, device="cuda")  # every score equal
    _, ids = _native("moe_route")(logits, logits.new_empty(0), 8, 1, 1, True, 1.0)
    assert ids.tolist() == [list(range(8))] * 4


def test_moe_route_rejects_bad_arguments():
    logits = torch.randn(2, 384, device="cuda")
    fn = _native("moe_route")
    with pytest.raises(RuntimeError, match="float32"):
        fn(logits.half(), logits.new_empty(0), 8, 1, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="top_k"):
        fn(logits, logits.new_empty(0), 0, 1, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="divisible"):
        fn(logits, logits.new_empty(0), 8, 7, 1, True, 1.0)


# ---------------------------------------------------------------------------------------------
# INT4 MoE experts.


def _poison_allocator(mib: int = 512) -> None:
    """Fill free blocks of the caching allocator with NaN so a kernel output (or workspace) that is
    not fully written shows up as NaN instead of passing on stale zeros."""
    junk = torch.full((mib << 18,), float("nan"), device="cuda")
    del junk


def _moe_weights(gen, experts, hidden, inter, group_size):
    def one(rows, cols):
        q = torch.randint(
            -8, 8, (experts, rows, cols), generator=gen, device="cuda", dtype=torch.int8
        )
        scale = torch.rand(experts, rows, cols // group_size, generator=gen, device="cuda")
        return pack_int4(q), (scale * 0.05 + 0.005).to(torch.bfloat16)

    return (*one(2 * inter, hidden), *one(hidden, inter))


def _routing(gen, tokens, experts, top_k, skew=False):
    if skew:  # Zipf-like: a few experts take most of the tokens
        probs = 1.0 / torch.arange(1, experts + 1, device="cuda", dtype=torch.float32)
        ids = torch.multinomial(probs.expand(tokens, experts), top_k, generator=gen)
    else:
        ids = torch.rand(tokens, experts, generator=gen, device="cuda").argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=gen, device="cuda")
    return weights / weights.sum(-1, keepdim=True) * 2.827, ids.to(torch.int32)


def _assert_moe_close(got, x, w, tw, ids, gs):
    want = reference.int4_moe_experts(x.float(), *w, tw, ids, gs)  # fp32 dequant and math
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.isfinite(got).all()
    scale = want.abs().max().item() + 1e-6
    err = (got.float() - want).abs().max().item()
    assert err <= 2e-2 * scale, f"max error {err:.3g} vs output scale {scale:.3g}"
    if want.norm() > 0:
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert cos.item() >= 0.9999, f"cosine {cos.item():.6f}"


# (tokens, experts, top_k, hidden, inter, group_size, skew): Kimi K2.6 TP8 shard (384 experts,
# I = 2048 / 8) and EP8 shard (48 experts, full I) at decode and prefill batch sizes (>= 16 pairs
# per expert switches to 32-token tiles), ragged/skewed loads, a chunked input, small widths.
MOE_CASES = [
    (1, 384, 8, 7168, 256, 32, False),
    (8, 384, 8, 7168, 256, 32, False),
    (33, 384, 8, 7168, 256, 32, True),
    (1, 48, 8, 7168, 2048, 32, False),
    (16, 48, 8, 7168, 2048, 32, False),
    (300, 48, 8, 7168, 2048, 32, True),
    (2400, 16, 8, 7168, 256, 32, False),  # > one 2340-token chunk
    (5, 16, 8, 256, 64, 32, False),
    (7, 4, 2, 256, 96, 32, False),  # I not a multiple of the 128-wide K block
    (9, 8, 1, 512, 128, 64, False),
    (64, 8, 8, 256, 128, 128, True),
]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "gs", "skew"), MOE_CASES)
def test_int4_moe_matches_reference(tokens, experts, top_k, hidden, inter, gs, skew):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7919 + experts * 31 + inter)
    w = _moe_weights(gen, experts, hidden, inter, gs)
    tw, ids = _routing(gen, tokens, experts, top_k, skew)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    _poison_allocator()
    got = _native("int4_moe_experts")(x, *w, tw, ids, gs)
    torch.cuda.synchronize()
    _assert_moe_close(got, x, w, tw, ids, gs)
    # Deterministic, and a token's output does not depend on the rest of the batch.
    assert torch.equal(got, _native("int4_moe_experts")(x, *w, tw, ids, gs))
    one = _native("int4_moe_experts")(x[:1], *w, tw[:1], ids[:1], gs)
    assert torch.equal(one, got[:1])


def test_int4_moe_edge_routing():
    gen = torch.Generator(device="cuda").manual_seed(5)
    w = _moe_weights(gen, 16, 256, 64, 32)
    x = torch.randn(6, 256, generator=gen, device="cuda").to(torch.bfloat16)
    tw = torch.rand(6, 4, generator=gen, device="cuda")
    fn = _native("int4_moe_experts")
    # Every token on expert 3 (plus others): one full expert, most experts empty.
    ids = torch.tensor([[3, 1, 7, 9]] * 6, dtype=torch.int32, device="cuda")
    _assert_moe_close(fn(x, *w, tw, ids, 32), x, w, tw, ids, 32)
    # Expert parallelism: negative ids contribute nothing; two halves sum to the whole.
    half = 8
    full = fn(x, *w, tw, ids, 32).float()
    parts = []
    for lo in (0, half):
        local = torch.where((ids >= lo) & (ids < lo + half), ids - lo, -1).to(torch.int32)
        parts.append(fn(x, *[t[lo : lo + half] for t in w], tw, local, 32).float())
    # Each half is rounded to bf16 on its own: compare on the output's scale.
    torch.testing.assert_close(
        parts[0] + parts[1], full, atol=2e-2 * full.abs().max().item(), rtol=0
    )
    _poison_allocator()
    nothing = fn(x, *w, tw, torch.full_like(ids, -1), 32)
    assert torch.equal(nothing, torch.zeros_like(x))
    assert fn(x[:0], *w, tw[:0], ids[:0], 32).shape == (0, 256)


def test_int4_moe_rejects_bad_arguments():
    gen = torch.Generator(device="cuda").manual_seed(6)
    w = _moe_weights(gen, 4, 256, 64, 32)
    tw, ids = _routing(gen, 2, 4, 2)
    x = torch.randn(2, 256, device="cuda").to(torch.bfloat16)
    fn = _native("int4_moe_experts")
    with pytest.raises(RuntimeError, match="bfloat16"):
        fn(x.float(), *w, tw, ids, 32)
    with pytest.raises(RuntimeError, match="group_size"):
        fn(x, *w, tw, ids, 16)
    with pytest.raises(RuntimeError, match="w13_packed must be"):
        fn(torch.randn(2, 512, device="cuda").to(torch.bfloat16), *w, tw, ids, 32)


# ---------------------------------------------------------------------------------------------
# MLA decode.


def _paged(gen, lens, heads, dim, num_spare_pages=3):
    """q, a NaN-poisoned cache whose used pages hold random latents, a randomly permuted block
    table (unused entries point at poisoned pages) and seq_lens."""
    pages_per_seq = [max(1, (n + 63) // 64) for n in lens]
    total = sum(pages_per_seq) + num_spare_pages
    cache = torch.full((total, 64, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(total, generator=gen, device="cuda").int()
    table = torch.full((len(lens), max(pages_per_seq)), int(perm[-1]), dtype=torch.int32)
    at = 0
    for b, (n, p) in enumerate(zip(lens, pages_per_seq, strict=True)):
        table[b, :p] = perm[at : at + p].cpu()
        flat = torch.randn(p * 64, dim, generator=gen, device="cuda").to(torch.bfloat16)
        flat[n:] = float("nan")  # slots past the sequence: must never be read
        cache[perm[at : at + p].long()] = flat.view(p, 64, dim)
        at += p
    q = torch.randn(len(lens), heads, dim, generator=gen, device="cuda").to(torch.bfloat16)
    return q, cache, table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


# (seq_lens, heads, dim, rank): Kimi TP8 (8 heads of 576/512), TP1 (64 heads: 4 head groups),
# 1 and 16 heads, lengths around page edges, long single sequences (split-KV), varlen batches.
MLA_CASES = [
    ([1], 8, 576, 512),
    ([63], 8, 576, 512),
    ([64], 8, 576, 512),
    ([65], 8, 576, 512),
    ([1, 100, 4097], 8, 576, 512),
    ([16384], 8, 576, 512),
    ([16384, 16385], 8, 576, 512),  # 256 and 257 pages: 64 and 52 splits in one batch
    ([70000], 8, 576, 512),
    ([4096] * 32, 8, 576, 512),
    ([257, 31, 1000, 5000], 64, 576, 512),
    ([300, 2], 16, 576, 512),
    ([129, 17], 1, 576, 512),
    ([77, 640], 4, 144, 128),
]


@pytest.mark.parametrize(("lens", "heads", "dim", "rank"), MLA_CASES)
def test_mla_decode_matches_reference(lens, heads, dim, rank):
    gen = torch.Generator(device="cuda").manual_seed(sum(lens) + heads)
    q, cache, table, seq_lens = _paged(gen, lens, heads, dim)
    scale = 192**-0.5
    _poison_allocator()
    out, lse = _native("mla_decode")(q, cache, table, seq_lens, scale, rank)
    torch.cuda.synchronize()
    want_out, want_lse = reference.mla_decode(
        q.float(), cache.float(), table, seq_lens, scale, rank
    )
    assert out.dtype == torch.bfloat16 and out.shape == (len(lens), heads, rank)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # P is rounded to bf16 before P·V (as FlashMLA does): up to ~2e-3 absolute on short rows.
    torch.testing.assert_close(out.float(), want_out, atol=4e-3, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=2e-4)
    # A sequence's result does not depend on the batch it is in, nor on unused table columns.
    out0, lse0 = _native("mla_decode")(q[:1], cache, table[:1], seq_lens[:1], scale, rank)
    assert torch.equal(out0, out[:1]) and torch.equal(lse0, lse[:1])
    wide = torch.cat([table, table[:, :1].expand(-1, 300)], dim=1).contiguous()
    out_w, lse_w = _native("mla_decode")(q, cache, wide, seq_lens, scale, rank)
    assert torch.equal(out_w, out) and torch.equal(lse_w, lse)


def test_mla_decode_zero_length_and_bad_arguments():
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, cache, table, _ = _paged(gen, [10, 10], 8, 576)
    fn = _native("mla_decode")
    lens = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    out, lse = fn(q, cache, table, lens, 0.1, 512)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all()
    with pytest.raises(RuntimeError, match="bfloat16"):
        fn(q.float(), cache, table, lens, 0.1, 512)
    with pytest.raises(RuntimeError, match="kv_lora_rank"):
        fn(q, cache, table, lens, 0.1, 516)
    with pytest.raises(RuntimeError, match="kv_cache must be"):
        fn(q, cache[:, :32], table, lens, 0.1, 512)


@pytest.mark.parametrize(
    ("tokens", "experts", "tile"), [(1, 384, 8), (37, 384, 8), (256, 48, 8), (4096, 384, 32)]
)
def test_moe_align_metadata(tokens, experts, tile):
    gen = torch.Generator(device="cuda").manual_seed(tokens + experts)
    ids = torch.rand(tokens, 384, generator=gen, device="cuda").argsort(-1)[:, :8]
    ids = torch.where(ids < experts, ids, -1).int()  # EP: other ranks' experts are -1
    sorted_pairs, expert, start, length, count = _native("moe_align")(ids, experts, tile)
    flat = ids.flatten().cpu()
    counts = torch.bincount(flat[flat >= 0].long(), minlength=experts)
    n = int(count.item())
    assert n == int(((counts + tile - 1) // tile).sum())
    want_tiles, at = [], 0
    for e, c in enumerate(counts.tolist()):
        for first in range(0, c, tile):
            want_tiles.append((e, at + first, min(tile, c - first)))
        at += c
    got_tiles = list(zip(expert[:n].tolist(), start[:n].tolist(), length[:n].tolist(), strict=True))
    assert got_tiles == want_tiles
    # Each expert's segment holds exactly its pairs (in any order).
    pairs, at = sorted_pairs.cpu(), 0
    for e, c in enumerate(counts.tolist()):
        want = (flat == e).nonzero().squeeze(1)
        assert torch.equal(pairs[at : at + c].sort().values, want.int()), f"expert {e}"
        at += c


# (rows, vocab, words): Kimi's vocabulary at batch 1 and 64, a vocab that is no multiple of 32 or
# of the kernel's 4 tokens per thread, a mask narrower than the vocabulary.
BITMASK_CASES = [(1, 163840, 5120), (64, 163840, 5120), (3, 1001, 32), (2, 1000, 16)]


@pytest.mark.parametrize(("rows", "vocab", "words"), BITMASK_CASES)
def test_apply_token_bitmask_matches_reference(rows, vocab, words):
    gen = torch.Generator().manual_seed(vocab + rows)
    bits = torch.randint(-(2**31), 2**31, (rows, words), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32)
    bits[:, ::3] = 0
    bits[:, 1::3] = -1
    logits = torch.randn(rows, vocab, generator=gen)
    logits[:, 5::13] = float("nan")
    want = reference.apply_token_bitmask_(logits.clone(), bits)
    got = logits.cuda()
    _native("apply_token_bitmask")(got, bits.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
