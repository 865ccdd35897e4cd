"""Serving through gRPC against the offline engine on the same checkpoint, in one run.

    python bench/serve.py [--concurrency 1 8 32 64] [--output-tokens 64] [--json]

Starts ``kimi-grpc serve`` on the demo checkpoint (localhost, CPU), then for each concurrency c
sends 2·c Generate streams (c at a time; prompts of ~100 tokens, greedy, ``ignore_eos``) and
reports TTFT p50/p99, inter-token latency p50/p99 and output tokens/s. Baseline, measured in the
same run after the server is stopped: the offline engine (``LLM.generate``) on the same requests
at the ratio concurrency (32 by default) with the same thread count. Goal: gRPC ≥ 90% of offline.

Also reported, in microseconds per output token: the server's whole overhead at the ratio
concurrency, ``(1/grpc_rate − 1/offline_rate)`` (gRPC, asyncio, detokenization, metrics, the
client in the same 2 cores), and the AgentStep stream parser's cost alone (``StreamParser.feed``
on a Kimi-format output fed token by token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.client import AsyncKimiClient  # noqa: E402
from kimi_grpc.engine.llm import LLM  # noqa: E402
from kimi_grpc.parsers import StreamParser  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402
from tests.server_harness import start_server  # noqa: E402

WORDS = ["kimi", "serves", "agents", "with", "tools", "and", "long", "context", "across", "many"]


def prompts(count: int) -> list[str]:
    # ~100 tokens each, distinct from the first word on so no prefix is shared.
    return [
        f"{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80)) for i in range(count)
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_level(target: str, concurrency: int, output_tokens: int) -> dict:
    texts = prompts(2 * concurrency)
    params = {"max_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True}
    ttft, itl, total = [], [], 0
    gate = asyncio.Semaphore(concurrency)

    async with AsyncKimiClient(target) as client:

        async def one(text: str) -> None:
            nonlocal total
            async with gate:
                start = time.perf_counter()
                last = None
                async for response in client.generate(text, params):
                    if not response.HasField("delta") or not response.delta.token_ids:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        itl.append(now - last)
                    last = now
                    total += len(response.delta.token_ids)

        begin = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - begin
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "output_tokens": total,
        "tokens_per_s": total / wall,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
    }


def offline_rate(concurrency: int, output_tokens: int) -> float:
    llm = LLM(max_num_seqs=concurrency)
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    texts = prompts(2 * concurrency)
    llm.generate(texts[:1], SamplingParams(max_tokens=2))  # warm-up
    begin = time.perf_counter()
    outputs = llm.generate(texts, params)
    wall = time.perf_counter() - begin
    return sum(len(o.token_ids) for o in outputs) / wall


def parser_us_per_token() -> float:
    """StreamParser cost per token on a reasoning + content + two-call output."""
    call = '{"city": "Paris", "days": [1, 2, 3], "units": "metric"}'
    text = (
        "Let me think about which tools to call for this request. " * 20
        + "</think>I will check both.<|tool_calls_section_begin|>"
        + "".join(
            f"<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{call}"
            "<|tool_call_end|>"
            for i in range(2)
        )
        + "<|tool_calls_section_end|>"
    )
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]  # ~4 chars per token
    rounds = 50
    begin = time.perf_counter()
    for _ in range(rounds):
        parser = StreamParser(thinking=True)
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
    return (time.perf_counter() - begin) / (rounds * len(pieces)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--ratio-concurrency", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    server = start_server("--max-num-seqs", str(max(args.concurrency)))
    try:
        levels = [
            asyncio.run(run_level(server.target, c, args.output_tokens)) for c in args.concurrency
        ]
    finally:
        server.terminate()

    import torch

    torch.set_num_threads(args.threads)
    offline = offline_rate(args.ratio_concurrency, args.output_tokens)
    at_ratio = next(r for r in levels if r["concurrency"] == args.ratio_concurrency)
    grpc_rate = at_ratio["tokens_per_s"]
    result = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {args.threads} threads",
        "levels": levels,
        "offline_tokens_per_s": offline,
        "grpc_over_offline": grpc_rate / offline,
        "server_overhead_us_per_token": (1 / grpc_rate - 1 / offline) * 1e6,
        "parser_us_per_token": parser_us_per_token(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"commit {result['commit']} on {result['machine']}, demo checkpoint, CPU")
    print("conc  reqs  tok/s   TTFT p50/p99 ms   ITL p50/p99 ms")
    for r in levels:
        print(
            f"{r['concurrency']:>4}  {r['requests']:>4}  {r['tokens_per_s']:6.1f}  "
            f"{r['ttft_p50_ms']:7.1f} /{r['ttft_p99_ms']:7.1f}  "
            f"{r['itl_p50_ms']:6.1f} /{r['itl_p99_ms']:6.1f}"
        )
    print(
        f"offline engine at concurrency {args.ratio_concurrency}: {offline:.1f} tok/s; "
        f"gRPC/offline = {result['grpc_over_offline']:.2f} (goal >= 0.90)"
    )
    print(
        f"server overhead {result['server_overhead_us_per_token']:.0f} us/token; "
        f"stream parser {result['parser_us_per_token']:.1f} us/token"
    )


if __name__ == "__main__":
    main()
