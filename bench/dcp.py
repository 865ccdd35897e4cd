"""Decode context parallelism vs plain tensor parallelism on the CPU (issue 17).

    python bench/dcp.py [--batches 8 32] [--context 1024] [--steps 16] [--json]

Two engines on the demo checkpoint (float32, gloo, two processes each): TP=2 (every rank holds
every token's latent) and TP=2 × DCP=2 (each rank holds every other token). For each batch size B,
B requests with ``--context``-token random prompts are prefilled, then ``--steps`` decode steps
are timed (every sequence decoding; greedy, ignore_eos). Per decode step: wall time, and the time
rank 0 spends inside collectives (torch.distributed calls, wrapped with timers in this process;
it includes waiting for the slower rank, so it is the step's synchronisation cost, not wire time
alone), split into the TP collectives every layout has and the DCP ones (query / LSE all-gathers,
the merge's reduce-scatter). Also: KV tokens each layout holds in the same per-rank budget, and a
check that both layouts give the same tokens. Baseline: TP=2 in the same run.

On two cores the ranks share the machine, so step times show the extra work and synchronisation
DCP adds at a given batch, not the capacity it buys (the point of DCP; the memory plan and
docs/DEPLOY.md count that).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.engine.llm import load_engine  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402

TP_CALLS = ("all_reduce", "all_gather", "broadcast")
DCP_CALLS = ("all_gather_single", "reduce_scatter_single")


class CollectiveTimer:
    """Wraps rank 0's torch.distributed collectives with wall-clock timers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved = {name: getattr(dist, name) for name in TP_CALLS + DCP_CALLS}
        for name, fn in self._saved.items():
            setattr(dist, name, self._timed(name, fn))

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return call

    def reset(self) -> None:
        self.seconds.clear()

    def close(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def run(dcp: int, batch: int, context: int, steps: int, timer: CollectiveTimer) -> dict:
    rng = random.Random(batch)
    prompts = [[rng.randrange(100, 1800) for _ in range(context)] for _ in range(batch)]
    engine = load_engine(
        dtype="float32",
        tensor_parallel_size=2,
        decode_context_parallel_size=dcp,
        kv_cache_memory=256 * 1024**2,
        max_num_seqs=batch,
        max_num_batched_tokens=4096,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        tokens: dict[str, list[int]] = defaultdict(list)

        def step() -> None:
            for delta in engine.step():
                tokens[delta.request_id].extend(delta.token_ids)

        while sum(len(t) for t in tokens.values()) < batch:  # prefill: every first token out
            step()
        step()  # one warm decode step
        timer.reset()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
        seconds = dict(timer.seconds)
        while engine.has_unfinished_requests():
            step()
        kv_tokens = engine.blocks.num_pages * engine.blocks.page_size
    finally:
        engine.shutdown()
    return {
        "dcp": dcp,
        "batch": batch,
        "step_ms": 1e3 * wall / steps,
        "tp_collective_ms": 1e3 * sum(seconds.get(n, 0.0) for n in TP_CALLS) / steps,
        "dcp_collective_ms": 1e3 * sum(seconds.get(n, 0.0) for n in DCP_CALLS) / steps,
        "kv_tokens": kv_tokens,
        "tokens": [tokens[f"r{i}"] for i in range(batch)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    timer = CollectiveTimer()
    rows = []
    try:
        for batch in args.batches:
            base = run(1, batch, args.context, args.steps, timer)
            dcp = run(2, batch, args.context, args.steps, timer)
            same = base.pop("tokens") == dcp.pop("tokens")
            for row in (base, dcp):
                row.update(same_tokens=same, step_vs_tp=row["step_ms"] / base["step_ms"])
                rows.append(row)
    finally:
        timer.close()
    if args.json:
        print(json.dumps({"context": args.context, "steps": args.steps, "rows": rows}, indent=2))
        return
    print(f"demo model, float32, 2 gloo ranks, context {args.context}, {args.steps} decode steps")
    print(
        f"{'layout':>12}{'batch':>7}{'step ms':>9}{'x TP2':>7}{'TP coll ms':>12}"
        f"{'DCP coll ms':>13}{'KV tokens':>11}{'same':>6}"
    )
    for r in rows:
        layout = "TP2 x DCP2" if r["dcp"] > 1 else "TP2"
        print(
            f"{layout:>12}{r['batch']:>7}{r['step_ms']:>9.1f}{r['step_vs_tp']:>6.2f}x"
            f"{r['tp_collective_ms']:>12.1f}{r['dcp_collective_ms']:>13.1f}"
            f"{r['kv_tokens']:>11,}{r['same_tokens']!s:>6}"
        )


if __name__ == "__main__":
    main()
