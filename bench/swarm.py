"""Agent Swarm at full width: 300 sub-agents × 5 steps against one server, three runs in a row.

    python bench/swarm.py [--agents 300] [--steps 5] [--runs 3] [--max-tokens 8] [--json]
                          [--server-arg=--kv-cache-memory=33554432 ...]

Starts ``kimi-grpc serve`` on the demo checkpoint (localhost, CPU) and runs the swarm in this
process with ScriptedDecisions (the demo cannot plan; every AgentStep is still served for real).
Per run: wall time, steps/s, server throughput (prompt tokens computed and generated tokens per
second, prefix-cache share of prompt tokens from GetServerStatus), the orchestrator's CPU time per
step (this process's CPU time — orchestrator, gRPC client, journal — over the steps; goal < 1 ms),
and the server's resident memory: after loading, peak during the run, after the run. Goals: the
peak growth stays within the KV cache budget, and RSS after run 3 ≈ after run 1 (no leak).
``--server-arg`` passes flags to the server (e.g. a small ``--kv-cache-memory`` and
``--host-kv-cache-memory``: the KV-tier figures of issue 17 — per run, prompt tokens recomputed
and the pages served from host, from GetServerStatus).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.checkpoint_maker import demo_checkpoint  # noqa: E402
from kimi_grpc.client import AsyncKimiClient, KimiClient  # noqa: E402
from kimi_grpc.config import load_model_config  # noqa: E402
from kimi_grpc.model.kv_cache import LatentKVCache  # noqa: E402
from kimi_grpc.swarm import ScriptedDecisions, Swarm, SwarmConfig, Tool, ToolRegistry  # noqa: E402
from tests.server_harness import start_server  # noqa: E402

SYSTEM = "You are a careful sub-agent: check every answer twice and report tersely. " * 40
MIB = 1024 * 1024


class PeakRss:
    """Samples a process's RSS every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


async def one_run(target: str, run_dir: Path, args: argparse.Namespace) -> dict:
    tools = ToolRegistry([Tool.from_function(lambda agent, step: "ok", name="record")])
    config = SwarmConfig(max_parallel=args.agents, max_tokens=args.max_tokens, system_prompt=SYSTEM)
    async with AsyncKimiClient(target) as client:
        swarm = Swarm(
            client,
            tools,
            run_dir,
            config,
            decisions=ScriptedDecisions(args.agents, args.steps, "record"),
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = await swarm.run("benchmark task")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    steps = report["totals"]["steps"]
    return {
        "wall_s": wall,
        "steps": steps,
        "outcomes": report["outcomes"],
        "steps_per_s": steps / wall,
        "orchestrator_cpu_ms_per_step": cpu / steps * 1e3,
        "completion_tokens": report["totals"]["completion_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], help="a flag for the server")
    args = ap.parse_args()

    server = start_server("--max-num-seqs", "256", "--max-queued-requests", "256", *args.server_arg)
    results = []
    try:
        client = KimiClient(server.target)
        status = client.server_status()
        rss_loaded = psutil.Process(server.proc.pid).memory_info().rss
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                before = client.server_status()
                sampler = PeakRss(server.proc.pid)
                run = asyncio.run(one_run(server.target, Path(tmp) / f"run{i}", args))
                peak = sampler.stop()
                after = client.server_status()
                prompt = after.prompt_tokens_total - before.prompt_tokens_total
                cached = after.cached_tokens_total - before.cached_tokens_total
                run.update(
                    prompt_tokens=prompt,
                    cached_share=cached / max(prompt, 1),
                    computed_prompt_tokens_per_s=(prompt - cached) / run["wall_s"],
                    generated_tokens_per_s=run["completion_tokens"] / run["wall_s"],
                    rss_peak_mib=peak / MIB,
                    rss_after_mib=psutil.Process(server.proc.pid).memory_info().rss / MIB,
                    kv_pages_used_after=after.kv_pages_used,
                    recomputed_prompt_tokens=prompt - cached,
                    host_hit_pages=after.kv_tiers.host_hit_pages - before.kv_tiers.host_hit_pages,
                    preemptions=after.num_preemptions - before.num_preemptions,
                )
                results.append(run)
        client.close()
    finally:
        server.terminate()
    # The KV pool's size: pages × page size × the demo's latent bytes per token (float32 on CPU).
    per_token = LatentKVCache.bytes_per_token(load_model_config(demo_checkpoint()), torch.float32)
    kv_bytes = status.kv_pages_total * status.page_size * per_token
    summary = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": f"{os.cpu_count()} cpus",
        "agents": args.agents,
        "steps_per_agent": args.steps,
        "rss_loaded_mib": rss_loaded / MIB,
        "kv_budget_mib": kv_bytes / MIB,
        "runs": results,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"commit {summary['commit']}, {summary['machine']}, demo checkpoint, "
        f"{args.agents} sub-agents x {args.steps} steps, max_tokens {args.max_tokens}"
    )
    print(f"server RSS after load {rss_loaded / MIB:.0f} MiB; KV budget {kv_bytes / MIB:.0f} MiB")
    print(
        "run  wall s  steps/s  gen tok/s  prefill tok/s  cached  orch ms/step  RSS peak/after MiB"
        "  recomputed  host pages  preempt  pages after"
    )
    for i, r in enumerate(results):
        print(
            f"{i + 1:>3}  {r['wall_s']:6.1f}  {r['steps_per_s']:7.1f}  "
            f"{r['generated_tokens_per_s']:9.1f}  {r['computed_prompt_tokens_per_s']:13.1f}  "
            f"{r['cached_share']:6.1%}  {r['orchestrator_cpu_ms_per_step']:12.3f}  "
            f"{r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f}"
            f"  {r['recomputed_prompt_tokens']:>10}  {r['host_hit_pages']:>10}"
            f"  {r['preemptions']:>7}  {r['kv_pages_used_after']:>11}"
        )


if __name__ == "__main__":
    main()
