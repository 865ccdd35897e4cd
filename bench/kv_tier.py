"""The host KV tier under agent-swarm pressure (issue 17): recompute, throughput, resume latency.

    python bench/kv_tier.py [--agents 64] [--rounds 6] [--sizes 0 1 4 16] [--json]

**Workload** (the demo model, float32, in process; ``LLMEngine`` driven directly): ``--agents``
sub-agents share a 256-token system prompt; each has a private history that starts at 192-512
tokens and grows every round by the previous answer (16 generated tokens) plus a "tool result"
of 48-160 tokens (seeded spread). Every round submits all agents' next prompts at once (a swarm
step after its tools returned) and steps the engine until all finish. The device pool is
``--device-pages`` pages of 16 tokens (default: ~1/10 of the final round's working set); the host
pool is ``size x`` the device pool for each ``--sizes`` entry (0 = tier off).

**Per size**: *recompute* = prompt tokens computed / prompt tokens submitted over rounds 2..R
(round 1 computes everything in every configuration); *steps/s* = agent steps (requests)
finished per second over rounds 2..R, as bench/swarm.py counts them; *resume TTFT p50/p99* = per
request, the time from its round's submission to its first token (rounds 2..R); *moved* = bytes
saved to and loaded from host; *host hit pages*.
Outputs are checked identical across sizes (greedy). Baseline: size 0 in the same run;
**goal: >= 2x steps/s over tier-off once the host pool holds the working set**.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.checkpoint_maker import demo_checkpoint  # noqa: E402
from kimi_grpc.config import load_model_config  # noqa: E402
from kimi_grpc.engine.llm import load_engine  # noqa: E402
from kimi_grpc.model.kv_cache import LatentKVCache  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402

PAGE = 16
OUTPUT = 16
SYSTEM = 256


def histories(agents: int, rounds: int, seed: int = 0) -> list[list[list[int]]]:
    """``prompts[r][a]``: agent a's prompt in round r (token ids below the demo vocabulary)."""
    rng = random.Random(seed)
    system = [rng.randrange(100, 1800) for _ in range(SYSTEM)]
    private = [
        [rng.randrange(100, 1800) for _ in range(rng.randrange(192, 513))] for _ in range(agents)
    ]
    prompts = []
    for _ in range(rounds):
        prompts.append([system + p for p in private])
        for p in private:  # the answer (stand-in ids) and the tool's result join the history
            p.extend(rng.randrange(100, 1800) for _ in range(OUTPUT + rng.randrange(48, 161)))
    return prompts


def run(prompts: list[list[list[int]]], device_pages: int, host_pages: int) -> dict:
    config = load_model_config(demo_checkpoint())
    per_page = PAGE * LatentKVCache.bytes_per_token(config, torch.float32)
    engine = load_engine(
        dtype="float32",
        page_size=PAGE,
        kv_cache_memory=device_pages * per_page,
        host_kv_cache_memory=host_pages * per_page,
        max_num_batched_tokens=2048,
    )
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True)
    outputs: list[list[list[int]]] = []
    submitted = computed = steps = 0
    busy = 0.0
    ttfts: list[float] = []
    for r, round_prompts in enumerate(prompts):
        start = time.perf_counter()
        first: dict[str, float] = {}
        tokens: dict[str, list[int]] = {}
        for a, prompt in enumerate(round_prompts):
            engine.add_request(f"r{r}a{a}", prompt, params)
        cached: dict[str, int] = {}
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.token_ids and delta.request_id not in first:
                    first[delta.request_id] = time.perf_counter() - start
                    cached[delta.request_id] = delta.num_cached_tokens
                tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        outputs.append([tokens[f"r{r}a{a}"] for a in range(len(round_prompts))])
        if r:  # round 1 fills the caches in every configuration
            busy += time.perf_counter() - start
            steps += len(round_prompts)
            submitted += sum(len(p) for p in round_prompts)
            computed += sum(len(p) - cached[f"r{r}a{a}"] for a, p in enumerate(round_prompts))
            ttfts.extend(first.values())
    stats = engine.stats()
    engine.shutdown()
    ttfts.sort()
    return {
        "host_pages": host_pages,
        "recompute": computed / submitted,
        "steps_per_s": steps / busy,
        "seconds": busy,
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "bytes_moved": stats.bytes_saved + stats.bytes_loaded,
        "host_hit_pages": stats.tiers.host_hit_pages,
        "preemptions": stats.num_preemptions,
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 1, 4, 16])
    ap.add_argument("--device-pages", type=int, help="default: ~1/10 of the working set")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prompts = histories(args.agents, args.rounds)
    working_set = -(-sum(len(p) + OUTPUT for p in prompts[-1]) // PAGE)
    device = args.device_pages or max(working_set // 10, 64)
    rows = [run(prompts, device, size * device) for size in args.sizes]
    same = all(r["outputs"] == rows[0]["outputs"] for r in rows)
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["speedup"] = r["steps_per_s"] / base
        del r["outputs"]
    result = {
        "agents": args.agents,
        "rounds": args.rounds,
        "working_set_pages": working_set,
        "device_pages": device,
        "outputs_identical": same,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.agents} agents x {args.rounds} rounds; working set {working_set} pages of {PAGE} "
        f"tokens at the last round, device pool {device} pages; outputs identical: {same}"
    )
    print(
        f"{'host pool':>10}{'recompute':>11}{'steps/s':>9}{'x off':>7}{'TTFT p50 ms':>13}"
        f"{'p99 ms':>9}{'moved MiB':>11}{'host hits':>11}{'preempt':>9}"
    )
    for r in rows:
        size = r["host_pages"] // device
        print(
            f"{f'{size}x':>10}{r['recompute']:>11.3f}{r['steps_per_s']:>9.1f}{r['speedup']:>6.2f}x"
            f"{r['ttft_p50_ms']:>13.0f}{r['ttft_p99_ms']:>9.0f}{r['bytes_moved'] / 2**20:>11.1f}"
            f"{r['host_hit_pages']:>11}{r['preemptions']:>9}"
        )


if __name__ == "__main__":
    main()
