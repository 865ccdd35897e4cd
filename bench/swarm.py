"""Agent Swarm at full width: 300 sub-agents × 5 steps against one server, three runs in a row.

    python bench/swarm.py [--agents 300] [--steps 5] [--runs 3] [--max-tokens 8] [--json]
                          [--server-arg=--kv-cache-memory=33554432 ...]
    python bench/swarm.py --kv-tier-study [--device-kv BYTES] [--host-kv BYTES]

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

Per run, *new* prompt tokens are the ones no cache could serve: every AgentStep request the swarm
sent is re-rendered with the server's Tokenize after the run, and each prompt counts its tokens
past the longest prefix it shares with any earlier prompt (an infinite, token-granular cache).
*Recomputed* = computed prompt tokens (prompt − served from cache) − new: tokens an earlier
request had already computed.

``--kv-tier-study`` (issue 17) runs the swarm once against each of three servers: a device KV
pool of ``--device-kv`` bytes (default 16 MiB, ~1/10 of the swarm's working set) with the host
tier off, the same pool with a host tier of ``--host-kv`` bytes (default 512 MiB) and retention
(on by default), and a 1 GiB pool that never evicts (tier off). Baseline: the tier-off server in
the same invocation.
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
from kimi_grpc.proto import inference_pb2 as pb  # noqa: E402
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


class RecordingSwarm(Swarm):
    """The swarm, keeping every AgentStep request it sends (to re-tokenize them afterwards)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[pb.AgentStepRequest] = []

    async def _call(self, request: pb.AgentStepRequest, timeout: float | None):
        self.requests.append(request)
        return await super()._call(request, timeout)


def new_prompt_tokens(client: KimiClient, requests: list[pb.AgentStepRequest]) -> tuple[int, int]:
    """The prompt tokens no cache could have served: each request's prompt (rendered by the
    server's Tokenize) minus its longest prefix shared with any earlier request's prompt, summed.
    An infinite, token-granular cache computes exactly these (a lower bound for any real one:
    it even shares what concurrent requests compute in the same step). -> (new, all) tokens."""
    trie: dict = {}
    new = total = 0
    for request in requests:
        chat = pb.ChatInput(
            messages=request.messages,
            tools=request.tools,
            mode=request.mode,
            preserve_thinking=request.preserve_thinking,
            chat_template_kwargs_json=request.chat_template_kwargs_json,
        )
        ids = client.tokenize(pb.TokenizeRequest(chat=chat)).token_ids
        node, shared = trie, 0
        for token in ids:
            child = node.get(token)
            if child is None:
                break
            node, shared = child, shared + 1
        new += len(ids) - shared
        total += len(ids)
        for token in ids[shared:]:
            node = node.setdefault(token, {})
    return new, total


async def one_run(target: str, run_dir: Path, args: argparse.Namespace) -> dict:
    tools = ToolRegistry([Tool.from_function(lambda agent, step: "ok", name="record")])
    config = SwarmConfig(max_parallel=args.agents, max_tokens=args.max_tokens, system_prompt=SYSTEM)
    async with AsyncKimiClient(target) as client:
        swarm = RecordingSwarm(
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
        "requests": swarm.requests,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agents", type=int, default=300)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], help="a flag for the server")
    ap.add_argument(
        "--kv-tier-study", action="store_true", help="tier off / on / floor, 1 run each"
    )
    ap.add_argument("--device-kv", type=int, default=16 * MIB)
    ap.add_argument("--host-kv", type=int, default=512 * MIB)
    args = ap.parse_args()
    if args.kv_tier_study:
        kv_tier_study(args)
        return
    summary = serve_and_run(args, args.server_arg)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"commit {summary['commit']}, {summary['machine']}, demo checkpoint, "
        f"{args.agents} sub-agents x {args.steps} steps, max_tokens {args.max_tokens}"
    )
    print(
        f"server RSS after load {summary['rss_loaded_mib']:.0f} MiB; "
        f"KV budget {summary['kv_budget_mib']:.0f} MiB"
    )
    print(
        "run  wall s  steps/s  gen tok/s  prefill tok/s  cached  orch ms/step  RSS peak/after MiB"
        "  computed     new  recomputed  host pages  preempt  pages after"
    )
    for i, r in enumerate(summary["runs"]):
        print(
            f"{i + 1:>3}  {r['wall_s']:6.1f}  {r['steps_per_s']:7.1f}  "
            f"{r['generated_tokens_per_s']:9.1f}  {r['computed_prompt_tokens_per_s']:13.1f}  "
            f"{r['cached_share']:6.1%}  {r['orchestrator_cpu_ms_per_step']:12.3f}  "
            f"{r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f}"
            f"  {r['computed_prompt_tokens']:>8}  {r['new_prompt_tokens']:>6}"
            f"  {r['recomputed_prompt_tokens']:>10}  {r['host_hit_pages']:>10}"
            f"  {r['preemptions']:>7}  {r['kv_pages_used_after']:>11}"
        )


def kv_tier_study(args: argparse.Namespace) -> None:
    args.runs = 1
    device = f"--kv-cache-memory={args.device_kv}"
    configs = {
        "tier off": [device],
        "host tier": [device, f"--host-kv-cache-memory={args.host_kv}"],
        "no evict": [f"--kv-cache-memory={1024 * MIB}"],
    }
    runs = {name: serve_and_run(args, flags)["runs"][0] for name, flags in configs.items()}
    off = runs["tier off"]
    for r in runs.values():
        r["steps_vs_off"] = r["steps_per_s"] / off["steps_per_s"]
        r["recomputed_vs_off"] = off["recomputed_prompt_tokens"] / max(
            r["recomputed_prompt_tokens"], 1
        )
    if args.json:
        print(json.dumps({"device_kv": args.device_kv, "host_kv": args.host_kv, **runs}, indent=2))
        return
    print(
        f"{args.agents} sub-agents x {args.steps} steps; device pool {args.device_kv / MIB:.0f} MiB"
        f", host tier {args.host_kv / MIB:.0f} MiB; 'no evict' = a 1 GiB pool, tier off"
    )
    print(
        f"{'server':>10}{'steps/s':>9}{'x off':>7}{'cached':>8}{'new':>9}{'computed':>10}"
        f"{'recomputed':>12}{'fewer':>8}{'host pages':>12}{'partial tok':>13}{'preempt':>9}"
        f"{'pages after':>13}"
    )
    for name, r in runs.items():
        print(
            f"{name:>10}{r['steps_per_s']:>9.1f}{r['steps_vs_off']:>6.2f}x"
            f"{r['cached_share']:>8.1%}{r['new_prompt_tokens']:>9}{r['computed_prompt_tokens']:>10}"
            f"{r['recomputed_prompt_tokens']:>12}{r['recomputed_vs_off']:>7.1f}x"
            f"{r['host_hit_pages']:>12}{r['partial_hit_tokens']:>13}{r['preemptions']:>9}"
            f"{r['kv_pages_used_after']:>13}"
        )


def serve_and_run(args: argparse.Namespace, server_args: list[str]) -> dict:
    """Starts a server with ``server_args``, runs the swarm ``args.runs`` times, stops it."""
    server = start_server("--max-num-seqs", "256", "--max-queued-requests", "256", *server_args)
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
                    computed_prompt_tokens=prompt - cached,
                    host_hit_pages=after.kv_tiers.host_hit_pages - before.kv_tiers.host_hit_pages,
                    partial_hit_tokens=after.kv_tiers.partial_hit_tokens
                    - before.kv_tiers.partial_hit_tokens,
                    preemptions=after.num_preemptions - before.num_preemptions,
                )
                new, tokenized = new_prompt_tokens(client, run.pop("requests"))
                if tokenized != prompt:  # retries also count: then the figures are approximate
                    print(
                        f"note: Tokenize gives {tokenized} prompt tokens, the server counted "
                        f"{prompt}",
                        file=sys.stderr,
                    )
                run["new_prompt_tokens"] = new
                run["recomputed_prompt_tokens"] = run["computed_prompt_tokens"] - new
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
    return summary


if __name__ == "__main__":
    main()
