"""Tensor-parallel step time on the CPU: TP=1 against TP=2 (gloo), and what the collectives cost.

    python bench/tp.py --workdir /tmp/kimi-bench-tp [--tp 1 2] [--moe tp ep] [--json]

Model: ``tp-wide`` (hidden 2048, 16 heads, dense FFN 8192, 64 INT4 experts of 512, top-8; 3
layers), wide enough that splitting each GEMM over two processes can pay for its all-reduces.
Workload: ``--batch`` greedy requests of ``--prompt`` tokens decoding ``--tokens`` tokens each,
after one warm-up request, ``--repeat`` rounds (the best kept). Reported per engine step (rank
0's view): the model forward (wall), the time inside the layers' collectives (all-reduce /
all-gather, including waiting for the slowest rank), and the step-metadata broadcast.
Baselines, measured in the same run: TP=1 on all cores (intra-op threads), and TP=1 on one
rank's share of the cores (per-core scaling). Ratios are against the first row; ``same`` checks
the greedy tokens equal the first row's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from kimi_grpc import LLM, SamplingParams
from kimi_grpc.checkpoint_maker import PRESETS, make_checkpoint
from kimi_grpc.parallel.state import ParallelContext

PRESETS.setdefault(
    "tp-wide",
    dict(
        PRESETS["demo"],
        hidden_size=2048,
        intermediate_size=8192,
        moe_intermediate_size=512,
        n_routed_experts=64,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
    ),
)


class CollectiveClock:
    """Wraps ParallelContext's collectives in this process (rank 0) with a wall clock."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        for name in ("all_reduce", "all_gather_last_dim"):
            original = getattr(ParallelContext, name)
            setattr(ParallelContext, name, self._timed(original))

    def _timed(self, fn):
        def wrapper(ctx, x):
            if ctx.tp_size == 1:
                return fn(ctx, x)
            start = time.perf_counter()
            try:
                return fn(ctx, x)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return wrapper


def run(path: Path, tp: int, moe: str, args, clock: CollectiveClock) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 1792) for _ in range(args.prompt)] for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    with LLM(
        str(path),
        tensor_parallel_size=tp,
        moe_parallel=moe,
        dtype="float32",
        kv_cache_memory=256 * 1024**2,
        max_model_len=4096,
    ) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        rounds = [measure(llm, prompts, params, clock) for _ in range(args.repeat)]
    best = min(rounds, key=lambda r: r["step_ms"])  # shared, noisy machines: the best round
    return {"tp": tp, "moe": moe, **best}


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, clock) -> dict:
    engine = llm.engine
    steps0, fwd0 = engine.timings.steps, engine.timings.forward
    comm0, calls0 = clock.seconds, clock.calls
    meta0 = engine.leader.sender.comm_seconds if engine.leader else 0.0
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    steps = engine.timings.steps - steps0
    meta = (engine.leader.sender.comm_seconds if engine.leader else 0.0) - meta0
    return {
        "steps": steps,
        "step_ms": 1e3 * (engine.timings.forward - fwd0) / steps,
        "collective_ms": 1e3 * (clock.seconds - comm0) / steps,
        "collectives_per_step": (clock.calls - calls0) / steps,
        "metadata_ms": 1e3 * meta / steps,
        "tok_per_s": len(prompts) * params.max_tokens / wall,
        "tokens": [o.token_ids for o in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/kimi-bench-tp")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--moe", nargs="+", default=["tp", "ep"], choices=["tp", "ep"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per config; best kept")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    path = Path(args.workdir) / "tp-wide"
    if not (path / "model.safetensors.index.json").exists():
        make_checkpoint(path, "tp-wide", seed=0)
    clock = CollectiveClock()
    threads = torch.get_num_threads()
    rows = []
    for tp in args.tp:
        for moe in args.moe if tp > 1 else ["tp"]:
            rows.append(dict(run(path, tp, moe, args, clock), threads_per_rank=threads // tp))
    # TP=1 again on one rank's share of the cores: the per-core scaling baseline.
    torch.set_num_threads(max(1, threads // max(args.tp)))
    rows.append(dict(run(path, 1, "tp", args, clock), threads_per_rank=torch.get_num_threads()))
    torch.set_num_threads(threads)
    base_tokens, base_ms = rows[0]["tokens"], rows[0]["step_ms"]
    for row in rows:
        row["speedup"] = base_ms / row["step_ms"]
        row["same_tokens_as_tp1"] = row.pop("tokens") == base_tokens
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "bench": "tp",
        "model": "tp-wide",
        "batch": args.batch,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "commit": commit,
    }
    if args.json:
        print(json.dumps({**meta, "rows": rows}))
        return
    print(
        f"tp-wide, batch {args.batch}, prompt {args.prompt}, {args.tokens} tokens, "
        f"{meta['cpus']} CPUs, commit {commit}"
    )
    header = f"{'TP':>3} {'moe':>4} {'thr':>3} {'step ms':>8} {'coll ms':>8} {'coll/step':>9} "
    print(header + f"{'meta ms':>8} {'tok/s':>7} {'vs TP=1':>8} same")
    for r in rows:
        cells = (
            f"{r['tp']:>3} {r['moe']:>4} {r['threads_per_rank']:>3} {r['step_ms']:>8.1f}",
            f"{r['collective_ms']:>8.1f} {r['collectives_per_step']:>9.0f}",
            f"{r['metadata_ms']:>8.2f} {r['tok_per_s']:>7.1f} {r['speedup']:>7.2f}x",
            str(r["same_tokens_as_tp1"]),
        )
        print(" ".join(cells))


if __name__ == "__main__":
    main()
