"""CPU micro-benchmark of the native hot-op kernels (``kimi_grpc._C``) against the PyTorch
reference ops (``kimi_grpc.ops.reference``), same inputs, same thread count.

    python bench/kernels.py [--json] [--quick]

Cases: ``int4_moe_experts`` (384 experts, top-8, group 32) at demo widths (H=128, I=32) and at
small K2-like widths (H=1024, I=256) for T in {1, 8, 64}; ``mla_decode`` at demo widths (4 heads,
D=80, rank 64) and K2 per-rank widths (8 heads, D=576, rank 512) for B in {1, 8, 64} and context
{512, 4096} (page size 64, shuffled pages). Each timing is the median of repeated calls after a
warm-up. Goal: native >= 2x the reference on 2 cores. The CUDA kernels have their own benchmark,
``bench/kernels_cuda.py`` (peaks first, then ratios to them; run by ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from kimi_grpc import _C
from kimi_grpc.ops import reference

MOE_WIDTHS = {"demo": (128, 32), "k2-small": (1024, 256)}  # (hidden, moe_intermediate)
MLA_WIDTHS = {"demo": (4, 80, 64), "k2-rank": (8, 576, 512)}  # (heads, D, kv_lora_rank)
EXPERTS, TOP_K, GROUP = 384, 8, 32


def timeit(fn, min_time: float = 0.3, min_reps: int = 3) -> float:
    """Median seconds per call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def compare(ref_fn, native_fn, args) -> tuple[float, float]:
    return timeit(lambda: ref_fn(*args)), timeit(lambda: native_fn(*args))


def moe_inputs(gen, tokens, hidden, inter):
    # Any int32 word is a valid packed row of 8 nibbles.
    def words(*shape):
        return torch.randint(-(2**31), 2**31, shape, dtype=torch.int64, generator=gen).to(
            torch.int32
        )

    def scales(*shape):
        return (torch.rand(*shape, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)

    w13 = words(EXPERTS, 2 * inter, hidden // 8)
    s13 = scales(EXPERTS, 2 * inter, hidden // GROUP)
    w2 = words(EXPERTS, hidden, inter // 8)
    s2 = scales(EXPERTS, hidden, inter // GROUP)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    weights = torch.rand(tokens, TOP_K, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    return x, w13, s13, w2, s2, weights, ids.to(torch.int32), GROUP


def mla_inputs(gen, batch, context, heads, dim, page_size=64):
    pages_per = (context + page_size - 1) // page_size
    kv = torch.randn(batch * pages_per, page_size, dim, generator=gen)
    table = torch.randperm(batch * pages_per, generator=gen).to(torch.int32).view(batch, pages_per)
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, dim, generator=gen)
    return q, kv, table, lens


def run(quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    sizes = (1, 8) if quick else (1, 8, 64)
    for name, (hidden, inter) in MOE_WIDTHS.items():
        for tokens in sizes:
            args = moe_inputs(gen, tokens, hidden, inter)
            ref, nat = compare(reference.int4_moe_experts, _C.int4_moe_experts_cpu, args)
            shape = f"E={EXPERTS} k={TOP_K} H={hidden} I={inter}"
            rows.append(
                dict(
                    op="int4_moe_experts",
                    widths=name,
                    shape=shape,
                    n=tokens,
                    ctx=None,
                    ref_ms=ref * 1e3,
                    native_ms=nat * 1e3,
                    speedup=ref / nat,
                )
            )
    for name, (heads, dim, rank) in MLA_WIDTHS.items():
        for batch in sizes:
            for context in (512, 4096):
                q, kv, table, lens = mla_inputs(gen, batch, context, heads, dim)
                scale = 1.0 / math.sqrt(192)
                args = (q, kv, table, lens, scale, rank)
                ref, nat = compare(reference.mla_decode, _C.mla_decode_cpu, args)
                shape = f"heads={heads} D={dim} R={rank}"
                rows.append(
                    dict(
                        op="mla_decode",
                        widths=name,
                        shape=shape,
                        n=batch,
                        ctx=context,
                        ref_ms=ref * 1e3,
                        native_ms=nat * 1e3,
                        speedup=ref / nat,
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="T/B in {1, 8} only")
    opts = parser.parse_args()
    rows = run(opts.quick)
    if opts.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=2))
        return
    print(f"CPU, {torch.get_num_threads()} threads (native vs reference, median per call)")
    print(
        f"{'op':<17}{'widths':<9}{'shape':<28}{'T/B':>4}{'ctx':>6}"
        f"{'ref ms':>10}{'native ms':>11}{'speedup':>9}"
    )
    for r in rows:
        ctx = "" if r["ctx"] is None else str(r["ctx"])
        print(
            f"{r['op']:<17}{r['widths']:<9}{r['shape']:<28}{r['n']:>4}{ctx:>6}"
            f"{r['ref_ms']:>10.3f}{r['native_ms']:>11.3f}{r['speedup']:>8.1f}x"
        )


if __name__ == "__main__":
    main()
