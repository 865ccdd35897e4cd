"""GPU benchmark of the CUDA kernels (``kimi_grpc._C.*_cuda``) as ratios to peaks measured in the
same run (kernel-targets.md §5): run by ``scripts/gpu_check.sh``.

    python bench/kernels_cuda.py [--json OUT.json] [--quick]

1. Peaks: copy bandwidth (``dst.copy_(src)`` on 2 GiB, 2x bytes counted) = BW, read bandwidth
   (``sum`` of 4 GiB), bf16 ``mm`` 8192³ = F.
2. ``int4_moe_experts`` at the K2.6 TP8 shard (384 experts, H=7168, I=256) and EP8 shard (48 local
   experts of 384, I=2048; slots of other ranks' experts are -1) for B tokens, uniform top-8
   routing redrawn per buffer set. Bytes = packed weights + scales of the experts touched + x +
   out. Baseline: bf16 ``grouped_mm`` pipeline (sort, gate_up, SiLU·mul, down, weighted
   index_add) on bf16 copies of the same experts and routing.
3. ``mla_decode``: 8 heads, D=576, rank 512, page 64, B x L; bytes = Σ L·1152 + q + out.
   Baselines: gather pages + two ``bmm`` + fp32 softmax, and the same on pre-gathered KV.
4. ``moe_route`` (384 experts, top-8) vs the eager torch reference, and route + ``moe_align``
   (the MoE's routing-metadata step) together.

Timing: every case cycles through N >= 8 independent buffer sets (N x working set >= 4x L2, so L2
does not flatter), captured as one CUDA graph of N calls, replayed R times; time per call =
elapsed / (N R), median of 5 replays. Launch overhead is excluded on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimi_grpc import _C
from kimi_grpc.int4 import dequantize_int4
from kimi_grpc.ops import reference

L2_BYTES = 50 << 20
TOP_K, GROUP, ROUTED_SCALE = 8, 32, 2.827
MOE_SHAPES = {  # name: (local experts, hidden, intermediate, total experts routed over)
    "tp8": (384, 7168, 256, 384),
    "ep8": (48, 7168, 2048, 384),
}


def graph_time(calls: list[Callable[[], object]], replays: int = 10) -> float:
    """Seconds per call: the calls captured once as a CUDA graph, replayed; median of 5 runs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / (replays * len(calls)))
    del graph
    return statistics.median(samples)


def event_time(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_seconds(elements: int) -> float:
    src = torch.empty(elements, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return event_time(lambda: dst.copy_(src))


def read_seconds(elements: int) -> float:
    big = torch.empty(elements, dtype=torch.bfloat16, device="cuda").normal_()
    return event_time(lambda: big.sum(dtype=torch.float32))


def mm_seconds(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return event_time(lambda: a @ b)


def peaks() -> dict:
    copy_s, read_s, mm_s = copy_seconds(1 << 30), read_seconds(2 << 30), mm_seconds(8192)
    return {
        "copy_bw": 2 * (2 << 30) / copy_s,
        "read_bw": (4 << 30) / read_s,
        "bf16_flops": 2 * 8192**3 / mm_s,
    }


def sets_for(working_set_bytes: float, minimum: int = 8, maximum: int = 64) -> int:
    return int(min(maximum, max(minimum, -(-4 * L2_BYTES // max(1, int(working_set_bytes))))))


# ---------------------------------------------------------------------------------------------
# INT4 MoE.


def moe_layer(gen, experts: int, hidden: int, inter: int):
    def words(*shape):  # any int32 is a valid word of 8 nibbles
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, device="cuda").int()

    def scales(*shape):
        return (torch.rand(*shape, generator=gen, device="cuda") * 0.02 + 0.001).bfloat16()

    return (
        words(experts, 2 * inter, hidden // 8),
        scales(experts, 2 * inter, hidden // GROUP),
        words(experts, hidden, inter // 8),
        scales(experts, hidden, inter // GROUP),
    )


def moe_routing(gen, tokens: int, routed_over: int, local: int):
    ids = torch.rand(tokens, routed_over, generator=gen, device="cuda").argsort(-1)[:, :TOP_K]
    ids = torch.where(ids < local, ids, -1).int()  # EP: the first `local` experts live here
    weights = torch.rand(tokens, TOP_K, generator=gen, device="cuda")
    return weights / weights.sum(-1, keepdim=True) * ROUTED_SCALE, ids


def moe_bytes(layer, ids: torch.Tensor, hidden: int) -> int:
    touched = torch.unique(ids[ids >= 0]).numel()
    per_expert = sum(t[0].numel() * t.element_size() for t in layer)
    return touched * per_expert + 2 * 2 * ids.shape[0] * hidden


def bf16_moe(x, w13_t, w2_t, weights, ids):
    """Baseline: sort pairs by expert, two bf16 grouped GEMMs, SiLU·mul, weighted index_add.
    Free of host syncs (graph-capturable): skipped slots sort last, past every group."""
    num_experts = w13_t.shape[0]
    flat = ids.flatten().long()
    key = torch.where(flat >= 0, flat, num_experts)
    order = key.argsort(stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offs = counts[:num_experts].cumsum(0).int()
    token = order // ids.shape[1]
    gate, up = F.grouped_mm(x[token], w13_t, offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, w2_t, offs=offs).float()
    valid = (key[order] < num_experts)[:, None]
    y = torch.where(valid, y * weights.flatten()[order, None], 0.0)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).bfloat16()


def bench_moe(shape: str, batches: list[int], bw: float) -> list[dict]:
    experts, hidden, inter, routed_over = MOE_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(1)
    layer_bytes = experts * 3 * hidden * inter * 0.5625
    n_sets = sets_for(layer_bytes)
    layers = [moe_layer(gen, experts, hidden, inter) for _ in range(n_sets)]
    n_bf16 = min(n_sets, 4)  # bf16 copies are 3.6x larger; 4 sets already dwarf L2
    bf16_layers = [
        (
            dequantize_int4(w13, s13, GROUP, torch.bfloat16).transpose(1, 2),
            dequantize_int4(w2, s2, GROUP, torch.bfloat16).transpose(1, 2),
        )
        for w13, s13, w2, s2 in layers[:n_bf16]
    ]
    rows = []
    for tokens in batches:
        routes = [moe_routing(gen, tokens, routed_over, experts) for _ in range(n_sets)]
        x = torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()
        ours = [
            (lambda lay=lay, r=r, x=x: _C.int4_moe_experts_cuda(x, *lay, r[0], r[1], GROUP))
            for lay, r in zip(layers, routes, strict=True)
        ]
        t_ours = graph_time(ours)
        nbytes = statistics.mean(
            moe_bytes(lay, r[1], hidden) for lay, r in zip(layers, routes, strict=True)
        )
        row = {
            "op": "int4_moe",
            "shape": shape,
            "B": tokens,
            "us": t_ours * 1e6,
            "bytes": nbytes,
            "bw_ratio": nbytes / t_ours / bw,
            "tflops": 2 * 3 * hidden * inter * int((routes[0][1] >= 0).sum()) / t_ours / 1e12,
        }
        try:
            base = [
                (lambda w=w, r=r, x=x: bf16_moe(x, w[0], w[1], r[0], r[1]))
                for w, r in zip(bf16_layers, routes, strict=False)
            ]
            t_base = graph_time(base)
            row["bf16_grouped_us"] = t_base * 1e6
            row["speedup_vs_bf16"] = t_base / t_ours
            bf16_bytes = nbytes * 2 / 0.5625  # same experts at 2 B per weight, no scales
            row["bf16_bw_ratio"] = bf16_bytes / t_base / bw
        except Exception as exc:  # the baseline is optional (torch build without grouped_mm)
            row["bf16_grouped_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# MLA decode.

MLA_HEADS, MLA_DIM, MLA_RANK = 8, 576, 512


def mla_set(gen, batch: int, context: int):
    pages = -(-context // 64)
    cache = torch.randn(batch * pages, 64, MLA_DIM, generator=gen, device="cuda").bfloat16()
    table = torch.randperm(batch * pages, generator=gen, device="cuda").int().view(batch, pages)
    q = torch.randn(batch, MLA_HEADS, MLA_DIM, generator=gen, device="cuda").bfloat16()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, cache, table, lens


def bmm_attention(q, kv, scale):
    """Baseline on contiguous kv [B, L, D]: scores, fp32 softmax, PV."""
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * scale
    return torch.bmm(scores.softmax(-1).to(kv.dtype), kv[..., :MLA_RANK])


def bench_mla(cases: list[tuple[int, int]], bw: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    scale = 192**-0.5
    rows = []
    for batch, context in cases:
        kv_bytes = batch * context * MLA_DIM * 2
        n_sets = sets_for(kv_bytes)
        sets = [mla_set(gen, batch, context) for _ in range(n_sets)]
        ours = [
            (lambda s=s: _C.mla_decode_cuda(s[0], s[1], s[2], s[3], scale, MLA_RANK)) for s in sets
        ]
        t_ours = graph_time(ours)
        nbytes = kv_bytes + batch * MLA_HEADS * (MLA_DIM + MLA_RANK) * 2
        row = {
            "op": "mla_decode",
            "B": batch,
            "L": context,
            "us": t_ours * 1e6,
            "bytes": nbytes,
            "bw_ratio": nbytes / t_ours / bw,
        }
        gathered = [
            (lambda s=s, b=batch: bmm_attention(s[0], s[1][s[2]].view(b, -1, MLA_DIM), scale))
            for s in sets
        ]
        row["speedup_vs_gather_bmm"] = graph_time(gathered) / t_ours
        contiguous = [(s[0], s[1][s[2]].view(batch, -1, MLA_DIM)) for s in sets[: min(n_sets, 8)]]
        pre = [(lambda c=c: bmm_attention(c[0], c[1], scale)) for c in contiguous]
        row["speedup_vs_bmm"] = graph_time(pre) / t_ours
        del contiguous, sets
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Router.


def bench_route(batches: list[int]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    for tokens in batches:
        sets = [
            (
                torch.randn(tokens, 384, generator=gen, device="cuda") * 2,
                torch.randn(384, generator=gen, device="cuda") * 0.1,
            )
            for _ in range(8)
        ]
        ours = [
            (lambda s=s: _C.moe_route_cuda(s[0], s[1], TOP_K, 1, 1, True, ROUTED_SCALE))
            for s in sets
        ]
        eager = [
            (lambda s=s: reference.moe_route(s[0], s[1], TOP_K, 1, 1, True, ROUTED_SCALE))
            for s in sets
        ]
        # Route + the MoE's routing-metadata step (moe_align, 8-token tiles), as one layer runs.
        fused = [
            (
                lambda s=s: _C.moe_align_cuda(
                    _C.moe_route_cuda(s[0], s[1], TOP_K, 1, 1, True, ROUTED_SCALE)[1], 384, 8
                )
            )
            for s in sets
        ]
        t_ours = graph_time(ours, replays=50)
        rows.append(
            {
                "op": "moe_route",
                "B": tokens,
                "us": t_ours * 1e6,
                "route_align_us": graph_time(fused, replays=50) * 1e6,
                "speedup_vs_eager": graph_time(eager, replays=20) / t_ours,
            }
        )
    return rows


def table(result: dict) -> str:
    p = result["peaks"]
    lines = [
        f"peaks: copy {p['copy_bw'] / 1e12:.2f} TB/s, read {p['read_bw'] / 1e12:.2f} TB/s, "
        f"bf16 mm {p['bf16_flops'] / 1e12:.0f} TFLOP/s",
        f"{'op':<11}{'case':<16}{'us':>9}{'BW ratio':>10}  vs baseline",
    ]
    for r in result["rows"]:
        if r["op"] == "int4_moe":
            case = f"{r['shape']} B={r['B']}"
            base = (
                f"{r['speedup_vs_bf16']:.2f}x bf16 grouped_mm (its BW {r['bf16_bw_ratio']:.2f})"
                if "speedup_vs_bf16" in r
                else r.get("bf16_grouped_error", "")
            )
        elif r["op"] == "mla_decode":
            case = f"B={r['B']} L={r['L']}"
            base = f"{r['speedup_vs_gather_bmm']:.1f}x gather+bmm, {r['speedup_vs_bmm']:.1f}x bmm"
        else:
            case = f"B={r['B']}"
            base = (
                f"{r['speedup_vs_eager']:.1f}x eager torch; route + align "
                f"{r['route_align_us']:.1f} us"
            )
        ratio = f"{r['bw_ratio']:.2f}" if "bw_ratio" in r else "-"
        lines.append(f"{r['op']:<11}{case:<16}{r['us']:>9.1f}{ratio:>10}  {base}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_cuda.py needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(), "peaks": peaks(), "rows": []}
    bw = result["peaks"]["copy_bw"]
    moe_batches = [1, 8, 32, 256] if args.quick else [1, 4, 8, 16, 32, 64, 256, 2048]
    for shape in MOE_SHAPES:
        result["rows"] += bench_moe(shape, moe_batches, bw)
        torch.cuda.empty_cache()
    mla_cases = [(1, 4096), (1, 16384), (32, 4096), (128, 4096)]
    if not args.quick:
        mla_cases += [(1, 131072), (64, 8192)]
    result["rows"] += bench_mla(mla_cases, bw)
    result["rows"] += bench_route([1, 32, 256, 4096])
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
