"""CUDA kernels against their PyTorch references (run by scripts/gpu_check.sh on a GPU machine;
skipped where no CUDA device exists). Fresh random inputs per case; outputs are new tensors, so
nothing stale can pass for a result."""

from __future__ import annotations

import pytest
import torch

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
