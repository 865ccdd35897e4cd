"""The host path around the forward (issue 18), measured with the stub forward.

    python bench/serving_path.py [--waits-ms 2 10] [--batches 1 32 256] [--steps 50]
                                 [--ceiling-streams 64 256 1024] [--seconds 10] [--procs 3]
                                 [--skip-overlap | --skip-ceiling] [--json]

1. **Overlap** (the engine alone). The real engine (scheduler, block manager, sampler, detokeniser,
   stop checks) on the demo checkpoint, with the model's forward replaced by
   ``engine.stub_forward`` — a wait with the GIL released, as a GPU forward is for the host, then
   logits. For each wait and batch size B, B requests with 16-token prompts are admitted and
   prefilled; then ``--steps`` decode steps (every sequence decoding, greedy, ignore_eos) are
   timed, with overlapped scheduling and without (the baseline, in the same run). Reported per
   step: wall time ÷ the stub's wait (goal ≤ 1.05) and the engine thread's host phases
   (schedule, prepare, process = the finished step's outputs), which overlap hides behind the
   forward as long as their sum stays under it.
2. **Serving ceiling** (the whole server). ``kimi-grpc serve --stub-forward-ms 0`` on the demo
   checkpoint pinned to one CPU, ``--procs`` load-generator processes pinned to the other, each
   holding its share of N concurrent ``Generate`` streams (raw ``grpc.aio`` stubs, 16-token
   prompts, 256 tokens each, re-issued as they end). Reported: streamed tokens/s and messages/s
   in a ``--seconds`` window after a warm-up, and the server's CPU µs per streamed token (user +
   system, all threads; psutil). Goal: ≥ 20,000 tokens/s at 256 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.engine.llm import load_engine  # noqa: E402
from kimi_grpc.engine.llm_engine import StepTimings  # noqa: E402
from kimi_grpc.engine.stub_forward import use_stub_forward  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402

PROMPT = 16


# ---- overlap: step time ÷ forward time ----------------------------------------------------------
def run(wait_s: float, batch: int, steps: int, overlap: bool) -> dict:
    torch.set_num_threads(1)  # as on a GPU node, the "device" work uses no host core
    engine = load_engine(
        dtype="float32",
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch * PROMPT),
        kv_cache_memory=64 * 1024**2,
        overlap_scheduling=overlap,
    )
    use_stub_forward(engine, wait_s)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [100 + (i + t) % 1000 for t in range(PROMPT)], params)
    started: set[str] = set()
    while len(started) < batch:  # admission + prefill: every request has its first token
        started.update(d.request_id for d in engine.step() if d.token_ids)
    engine.step()  # one warm decode step
    engine.timings = StepTimings()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    t = engine.timings
    engine.shutdown()
    return {
        "wait_ms": 1e3 * wait_s,
        "batch": batch,
        "overlap": overlap,
        "step_ms": 1e3 * wall,
        "step_over_forward": wall / wait_s,
        "schedule_ms": 1e3 * t.schedule / t.steps,
        "prepare_ms": 1e3 * t.prepare / t.steps,
        "process_ms": 1e3 * t.process / t.steps,
        "sample_ms": 1e3 * t.sample / t.steps,
    }


# ---- the serving ceiling: streamed tokens/s through gRPC with a zero-wait stub -----------------
def _loadgen(target: str, streams: int, start_at: float, stop_at: float, tokens: int) -> None:
    """One load-generator process: ``streams`` Generate streams kept open (closed loop) until
    ``stop_at``; prints JSON counts of the tokens and messages received in [start_at, stop_at)."""
    import grpc

    from kimi_grpc.client import generate_request
    from kimi_grpc.proto import inference_pb2_grpc as pb_grpc

    counts = {"tokens": 0, "messages": 0, "requests": 0}

    async def one_stream(stub, k: int) -> None:
        prompt = [100 + (k + t) % 900 for t in range(PROMPT)]
        params = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
        while time.time() < stop_at:
            async for response in stub.Generate(generate_request(prompt, params)):
                now = time.time()
                if now >= stop_at:
                    break
                if now >= start_at and response.HasField("delta"):
                    counts["tokens"] += len(response.delta.token_ids)
                    counts["messages"] += 1
            counts["requests"] += 1

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await asyncio.gather(*(one_stream(stub, k) for k in range(streams)))

    asyncio.run(main())
    print(json.dumps(counts), flush=True)


def ceiling(
    streams: int, seconds: float, warmup: float, procs: int, tokens: int, interval: int
) -> dict:
    """The demo server with ``--stub-forward-ms 0 --stream-interval interval`` pinned to CPU 0,
    ``procs`` load generators pinned to CPU 1, ``streams`` concurrent Generate streams in all."""
    from tests.server_harness import start_server

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpus = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    os.sched_setaffinity(0, server_cpu)  # the server inherits it
    srv = start_server(
        "--stub-forward-ms", "0", "--dtype", "float32", "--stream-interval", str(interval),
        "--max-num-seqs", str(streams), "--max-queued-requests", str(streams),
        "--kv-cache-memory", str(streams * (PROMPT + tokens + 64) * 4096),
    )  # fmt: skip
    os.sched_setaffinity(0, load_cpus)
    try:
        start_at = time.time() + warmup
        stop_at = start_at + seconds
        share = [streams // procs + (i < streams % procs) for i in range(procs)]
        window = [str(start_at), str(stop_at), str(tokens)]
        cmd = [sys.executable, __file__, "--_loadgen", srv.target]
        gens = [
            subprocess.Popen([*cmd, str(n), *window], stdout=subprocess.PIPE, text=True)
            for n in share
        ]
        server = psutil.Process(srv.proc.pid)
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = server.cpu_times()
        time.sleep(max(0.0, stop_at - time.time()))
        cpu1 = server.cpu_times()
        counts = [json.loads(g.communicate()[0]) for g in gens]
    finally:
        srv.terminate()
        os.sched_setaffinity(0, set(cpus))
    got = {k: sum(c[k] for c in counts) for k in counts[0]}
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "streams": streams,
        "stream_interval": interval,
        "tokens_per_s": got["tokens"] / seconds,
        "messages_per_s": got["messages"] / seconds,
        "server_cpu_us_per_token": 1e6 * cpu / max(got["tokens"], 1),
        "server_cpu_share": cpu / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--waits-ms", type=float, nargs="+", default=[2.0, 10.0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ceiling-streams", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--seconds", type=float, default=10.0, help="ceiling: the measured window")
    ap.add_argument("--warmup", type=float, default=8.0, help="ceiling: seconds before it")
    ap.add_argument("--procs", type=int, default=3, help="ceiling: load-generator processes")
    ap.add_argument("--tokens", type=int, default=256, help="ceiling: tokens per request")
    ap.add_argument(
        "--intervals", type=int, nargs="+", default=[1, 8], help="ceiling: --stream-interval"
    )
    ap.add_argument("--skip-overlap", action="store_true")
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_loadgen", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._loadgen:
        target, streams, start_at, stop_at, tokens = args._loadgen
        _loadgen(target, int(streams), float(start_at), float(stop_at), int(tokens))
        return
    rows = []
    if not args.skip_overlap:
        rows = [
            run(w / 1e3, b, args.steps, overlap)
            for w in args.waits_ms
            for b in args.batches
            for overlap in (False, True)
        ]
    ceilings = []
    if not args.skip_ceiling:
        ceilings = [
            ceiling(n, args.seconds, args.warmup, args.procs, args.tokens, interval)
            for interval in args.intervals
            for n in args.ceiling_streams
        ]
    if args.json:
        print(json.dumps({"overlap": rows, "ceiling": ceilings}, indent=2))
        return
    if rows:
        print(f"stub forward, demo engine, {args.steps} decode steps; goal step/forward <= 1.05")
        print(
            f"{'wait ms':>8}{'batch':>7}{'overlap':>9}{'step ms':>9}{'step/fwd':>10}"
            f"{'schedule':>10}{'prepare':>9}{'process':>9}{'sample':>8}"
        )
        for r in rows:
            print(
                f"{r['wait_ms']:>8.1f}{r['batch']:>7}{'on' if r['overlap'] else 'off':>9}"
                f"{r['step_ms']:>9.2f}{r['step_over_forward']:>10.3f}{r['schedule_ms']:>10.3f}"
                f"{r['prepare_ms']:>9.3f}{r['process_ms']:>9.3f}{r['sample_ms']:>8.3f}"
            )
    if ceilings:
        print(f"\nserving ceiling: zero-wait stub, {args.procs} load generators on the other CPU")
        print(
            f"{'interval':>8}{'streams':>8}{'tokens/s':>10}{'msgs/s':>9}{'server us/token':>17}"
            f"{'cpu':>6}"
        )
        for c in ceilings:
            print(
                f"{c['stream_interval']:>8}{c['streams']:>8}{c['tokens_per_s']:>10.0f}"
                f"{c['messages_per_s']:>9.0f}"
                f"{c['server_cpu_us_per_token']:>17.1f}{c['server_cpu_share']:>6.2f}"
            )


if __name__ == "__main__":
    main()
