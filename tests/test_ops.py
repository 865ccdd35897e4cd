"""Hot ops: references against independent formulations, native kernels against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from kimi_grpc import ops
from kimi_grpc.int4 import dequantize_int4, pack_int4
from kimi_grpc.ops import reference

ROUTINGS = [  # (experts, top_k, n_group, topk_group)
    (384, 8, 1, 1),
    (64, 6, 8, 3),
    (16, 4, 4, 2),
]


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend("auto")


@pytest.mark.parametrize(("experts", "top_k", "n_group", "topk_group"), ROUTINGS)
def test_reference_router_matches_transformers(experts, top_k, n_group, topk_group):
    config = DeepseekV3Config(
        hidden_size=32,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.827,
    )
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(experts)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, 32, generator=gen))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(experts, generator=gen))
    x = torch.randn(50, 32, generator=gen)
    logits, hf_weights, hf_ids = router(x)
    weights, ids = reference.moe_route(
        logits, router.e_score_correction_bias, top_k, n_group, topk_group, True, 2.827
    )
    order = hf_ids.sort(dim=-1)
    mine = ids.long().sort(dim=-1)
    assert torch.equal(order.values, mine.values)
    torch.testing.assert_close(
        weights.gather(1, mine.indices), hf_weights.gather(1, order.indices), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(("experts", "top_k", "n_group", "topk_group"), ROUTINGS)
def test_native_router_matches_reference(experts, top_k, n_group, topk_group):
    if not ops.native_available("moe_route", "cpu"):
        pytest.skip("kimi_grpc._C not built")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(257, experts, generator=gen) * 3
    bias = 0.2 * torch.randn(experts, generator=gen)
    for b in (bias, None):
        for renorm in (True, False):
            kwargs = dict(
                top_k=top_k,
                n_group=n_group,
                topk_group=topk_group,
                renormalize=renorm,
                routed_scaling_factor=2.5,
            )
            ops.set_backend("native")
            w_native, id_native = ops.moe_route(logits, b, **kwargs)
            ops.set_backend("reference")
            w_ref, id_ref = ops.moe_route(logits, b, **kwargs)
            assert id_native.dtype == torch.int32
            assert torch.equal(id_native, id_ref)
            torch.testing.assert_close(w_native, w_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_router_ties_go_to_lower_index(backend):
    if backend == "native" and not ops.native_available("moe_route", "cpu"):
        pytest.skip("kimi_grpc._C not built")
    ops.set_backend(backend)
    logits = torch.zeros(3, 16)
    logits[1, 9] = logits[1, 3] = 1.0  # two winners tied; the rest tied below
    weights, ids = ops.moe_route(logits, None, top_k=4, routed_scaling_factor=1.0)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert ids[1].tolist() == [3, 9, 0, 1]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    # Group-limited: groups {0..3} {4..7} {8..11} {12..15}, equal group scores -> groups 0 and 1.
    _, ids = ops.moe_route(torch.zeros(1, 16), None, top_k=3, n_group=4, topk_group=2)
    assert ids[0].tolist() == [0, 1, 2]


def _int4_weights(experts: int, rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (experts, rows, cols), generator=gen, dtype=torch.int8)
    scale = (torch.rand(experts, rows, cols // 32, generator=gen) * 0.02 + 0.01).bfloat16()
    return pack_int4(q), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_moe_experts_equals_dense_math(dtype):
    experts, hidden, inter, tokens, k = 8, 64, 32, 11, 3
    w13_p, w13_s = _int4_weights(experts, 2 * inter, hidden, 0)
    w2_p, w2_s = _int4_weights(experts, hidden, inter, 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, k, generator=gen)
    out = ops.int4_moe_experts(x, w13_p, w13_s, w2_p, w2_s, weights, ids, group_size=32)
    w13 = dequantize_int4(w13_p, w13_s, 32, torch.float32)
    w2 = dequantize_int4(w2_p, w2_s, 32, torch.float32)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t].float()).chunk(2)
            expected[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_mla_decode_reference_against_contiguous_attention():
    """Paged reads through a scattered block table equal plain softmax attention per sequence."""
    gen = torch.Generator().manual_seed(5)
    heads, lora, rope, page = 4, 16, 8, 4
    lengths = [1, 7, 12]
    num_pages = 12
    cache = torch.randn(num_pages, page, lora + rope, generator=gen)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, contig = [], []
    for length in lengths:
        n = -(-length // page)
        pages, perm = perm[:n], perm[n:]
        tables.append(pages + [0] * (3 - n))
        contig.append(torch.cat([cache[p] for p in pages])[:length])
    q = torch.randn(len(lengths), heads, lora + rope, generator=gen)
    out, lse = ops.mla_decode(
        q,
        cache,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(lengths, dtype=torch.int32),
        softmax_scale=0.3,
        kv_lora_rank=lora,
    )
    for b, kv in enumerate(contig):
        scores = q[b] @ kv.T * 0.3
        torch.testing.assert_close(out[b], torch.softmax(scores, -1) @ kv[:, :lora])
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1))


def test_backend_selection(monkeypatch):
    ops.set_backend("reference")
    assert not ops.native_available("moe_route", "cpu")
    with pytest.raises(ValueError, match="ops backend"):
        ops.set_backend("fast")
    monkeypatch.setenv("KIMI_GRPC_OPS", "bogus")
    ops._backend = None
    ops._native_op.cache_clear()
    with pytest.raises(ValueError, match="KIMI_GRPC_OPS"):
        ops.moe_route(torch.zeros(1, 8), None, top_k=2)
