"""Serving through gRPC and HTTP against the offline engine on the same checkpoint, in one run.

    python bench/serve.py [--concurrency 1 8 32 128] [--protocols grpc http] [--repeat 3]
                          [--output-tokens 64] [--threads 1] [--json]

Starts ``kimi-grpc serve --http-port 0`` on the demo checkpoint (localhost, CPU), then for each
concurrency c runs ``--repeat`` rounds; a round is the offline engine (``LLM.generate`` on the same
requests, in a fresh process while the server idles), then each protocol in turn (the order
rotates per round, because this VM's speed drifts), each sending 2·c streams, c at a time, of the
same ~100-token prompts, greedy, ``ignore_eos``, ``--output-tokens`` each:

- ``grpc``: Generate streams; ``http``: ``POST /v1/completions`` with ``stream: true`` (httpx, one
  keep-alive connection per stream in flight; tokens from the ``include_usage`` chunk);
- ``grpc-agent``: AgentStep in MODE_INSTANT; ``http-chat``: ``POST /v1/chat/completions`` with
  ``thinking: {"type": "disabled"}`` (the same one-user-message step).

Per protocol and concurrency: output tokens/s (median round), TTFT and inter-token latency
p50/p99 (all rounds pooled; gRPC times deltas with tokens, HTTP chunks with text), and the CPU
time of the server process and of this client per streamed token (psutil, all threads; the
server's includes the model, whose own share is the offline row's). Ratios are medians of the
rounds' back-to-back pairs: http/grpc (goal ≥ 0.90), http-chat/grpc-agent, and grpc/offline
(goal ≥ 0.90; the headline pairs at ``--ratio-concurrency``, 32, which always runs).

The server always runs one OpenMP thread (tests/server_harness.py sets OMP_NUM_THREADS=1), so only
``--threads 1`` (the default) gives the offline engine the same thread count.

Per output token, also: the server's whole overhead ``1/grpc_rate − 1/offline_rate`` of the median
pair (gRPC, asyncio, metrics and the client sharing the same cores), and micro-costs of the
pieces: incremental detokenization, building + serializing one delta message, and the AgentStep
stream parser (``StreamParser.feed`` on a Kimi-format output fed ~4 characters at a time).
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.client import AsyncKimiClient  # noqa: E402
from kimi_grpc.engine.llm import LLM  # noqa: E402
from kimi_grpc.parsers import StreamParser  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402
from tests.server_harness import start_server  # noqa: E402

WORDS = ["kimi", "serves", "agents", "with", "tools", "and", "long", "context", "across", "many"]
PROTOCOLS = ("grpc", "http", "grpc-agent", "http-chat")
# Throughput ratios reported when both sides ran: (numerator, denominator).
RATIOS = (("http", "grpc"), ("http-chat", "grpc-agent"), ("grpc", "offline"))
SERVER_THREADS = 1  # tests/server_harness.py starts the server with OMP_NUM_THREADS=1


@dataclass
class Server:
    target: str  # gRPC host:port
    http_base: str  # http://host:port/v1
    pid: int


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


def middle(values: list[float]) -> float:
    """The median round (the upper one of an even count, so it is one measured round)."""
    return sorted(values)[len(values) // 2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (and waited-for children)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


# ---- one stream per protocol ---------------------------------------------------------------------
class Tally:
    """What one protocol run saw: latencies, output tokens, failed streams."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.errors: Counter[str] = Counter()


class Clock:
    """One stream's timer: TTFT at its first output, then the gaps between outputs."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.start = time.perf_counter()
        self.last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.tally.ttft.append(now - self.start)
        else:
            self.tally.itl.append(now - self.last)
        self.last = now


def sampling(output_tokens: int) -> dict[str, Any]:
    return {"max_tokens": output_tokens, "temperature": 0.0, "ignore_eos": True}


async def grpc_generate(
    client: AsyncKimiClient, text: str, output_tokens: int, tally: Tally
) -> None:
    clock = Clock(tally)
    async for response in client.generate(text, sampling(output_tokens)):
        if response.HasField("delta") and response.delta.token_ids:
            clock.tick()
            tally.tokens += len(response.delta.token_ids)


async def grpc_agent(client: AsyncKimiClient, text: str, output_tokens: int, tally: Tally) -> None:
    clock = Clock(tally)
    messages = [{"role": "user", "content": text}]
    async for response in client.agent_step(
        messages, mode="instant", params=sampling(output_tokens)
    ):
        if response.HasField("delta") and response.delta.token_ids:
            clock.tick()
            tally.tokens += len(response.delta.token_ids)


async def http_completion(
    client: httpx.AsyncClient, text: str, output_tokens: int, tally: Tally
) -> None:
    body = {"prompt": text, **sampling(output_tokens)}
    await http_stream(client, "/completions", body, tally, lambda choice: bool(choice.get("text")))


def chat_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return any(delta.get(key) for key in ("content", "reasoning_content", "tool_calls"))


async def http_chat(client: httpx.AsyncClient, text: str, output_tokens: int, tally: Tally) -> None:
    body = {
        "messages": [{"role": "user", "content": text}],
        "thinking": {"type": "disabled"},
        **sampling(output_tokens),
    }
    await http_stream(client, "/chat/completions", body, tally, chat_output)


async def http_stream(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    tally: Tally,
    has_output: Callable[[dict[str, Any]], bool],
) -> None:
    """One SSE stream: times the chunks with output; tokens from the usage chunk (one per output
    chunk if none came)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    clock, chunks, usage = Clock(tally), 0, None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            tally.errors[f"HTTP {response.status_code}"] += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:  # after the headers: an error event ends the stream
                tally.errors[f"error event {event['error'].get('code')}"] += 1
                return
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            choices = event.get("choices")
            if choices and has_output(choices[0]):
                clock.tick()
                chunks += 1
    tally.tokens += chunks if usage is None else usage


STREAMS = {
    "grpc": grpc_generate,
    "http": http_completion,
    "grpc-agent": grpc_agent,
    "http-chat": http_chat,
}


def open_client(server: Server, protocol: str, concurrency: int) -> Any:
    if protocol.startswith("grpc"):
        return AsyncKimiClient(server.target)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=server.http_base, limits=limits, timeout=600.0)


def error_name(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"gRPC {exc.code().name}"
    return type(exc).__name__


# ---- runs, rounds, levels ------------------------------------------------------------------------
async def run_protocol(
    server: Server, protocol: str, concurrency: int, output_tokens: int, requests: int = 0
) -> dict:
    """2·c streams (or ``requests``), c at a time; raw latencies and the CPU both sides spent."""
    texts = prompts(requests or 2 * concurrency)
    tally, gate, stream = Tally(), asyncio.Semaphore(concurrency), STREAMS[protocol]

    async with open_client(server, protocol, concurrency) as client:

        async def one(text: str) -> None:
            async with gate:
                try:
                    await stream(client, text, output_tokens, tally)
                except (grpc.aio.AioRpcError, httpx.HTTPError) as exc:
                    tally.errors[error_name(exc)] += 1

        server_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds(os.getpid())
        begin = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - begin
        server_cpu = cpu_seconds(server.pid) - server_cpu
        client_cpu = cpu_seconds(os.getpid()) - client_cpu
    return {
        "requests": len(texts),
        "output_tokens": tally.tokens,
        "tokens_per_s": tally.tokens / wall,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "ttft": tally.ttft,
        "itl": tally.itl,
        "errors": dict(tally.errors),
    }


def run_round(
    server: Server, protocols: list[str], concurrency: int, output_tokens: int, turn: int
) -> dict[str, dict]:
    """Offline (the server idles), then each protocol; the order rotates with ``turn``."""
    runs = {"offline": offline_in_subprocess(concurrency, output_tokens)}
    k = turn % len(protocols)
    for protocol in protocols[k:] + protocols[:k]:
        runs[protocol] = asyncio.run(run_protocol(server, protocol, concurrency, output_tokens))
    return runs


def summarize(runs: list[dict]) -> dict:
    """One protocol at one concurrency over the rounds: median tok/s, pooled latencies, CPU."""
    tokens = sum(r["output_tokens"] for r in runs)
    ttft = [x for r in runs for x in r["ttft"]]
    itl = [x for r in runs for x in r["itl"]]
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    rates = [r["tokens_per_s"] for r in runs]
    per_token = 1e6 / tokens if tokens else float("nan")
    return {
        "requests": runs[0]["requests"],
        "output_tokens": tokens,
        "tokens_per_s": middle(rates),
        "tokens_per_s_rounds": rates,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "server_cpu_us_per_token": sum(r["server_cpu_s"] for r in runs) * per_token,
        "client_cpu_us_per_token": sum(r["client_cpu_s"] for r in runs) * per_token,
        "errors": dict(errors),
    }


def level_result(concurrency: int, rounds: list[dict[str, dict]], protocols: list[str]) -> dict:
    offline = [r["offline"] for r in rounds]
    ratios = {}
    for num, den in RATIOS:
        if num in rounds[0] and den in rounds[0]:
            values = [r[num]["tokens_per_s"] / r[den]["tokens_per_s"] for r in rounds]
            ratios[f"{num}/{den}"] = {"median": middle(values), "rounds": values}
    return {
        "concurrency": concurrency,
        "rounds": len(rounds),
        "offline": {
            "tokens_per_s": middle([o["tokens_per_s"] for o in offline]),
            "tokens_per_s_rounds": [o["tokens_per_s"] for o in offline],
            "cpu_us_per_token": middle([o["cpu_us_per_token"] for o in offline]),
        },
        "protocols": {p: summarize([r[p] for r in rounds]) for p in protocols},
        "ratios": ratios,
    }


# ---- the offline engine --------------------------------------------------------------------------
def offline_in_subprocess(concurrency: int, output_tokens: int) -> dict[str, float]:
    """The offline engine in a fresh process, like the server (no client)."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
        f"from bench.serve import offline_level; "
        f"print(json.dumps(offline_level({concurrency}, {output_tokens})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def offline_level(concurrency: int, output_tokens: int) -> dict[str, float]:
    """Output tokens/s of ``LLM.generate`` and its CPU time (all threads) per token."""
    llm = LLM(max_num_seqs=concurrency)
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    texts = prompts(2 * concurrency)
    llm.generate(texts, params)  # warm-up: the server it is compared with is warm too
    cpu, begin = time.process_time(), time.perf_counter()
    outputs = llm.generate(texts, params)
    wall, cpu = time.perf_counter() - begin, time.process_time() - cpu
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"tokens_per_s": tokens / wall, "cpu_us_per_token": cpu / tokens * 1e6}


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


def per_token_pieces_us() -> dict[str, float]:
    """Micro-costs per output token of the serving path's pieces (single thread)."""
    from kimi_grpc.proto import inference_pb2 as pb
    from kimi_grpc.tokenizer import IncrementalDetokenizer, KimiTokenizer, demo_tokenizer_dir

    tokenizer = KimiTokenizer.from_dir(demo_tokenizer_dir())
    ids = tokenizer.encode(" ".join(prompts(40))) * 5
    begin = time.perf_counter()
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    texts = [detok.push(t) for t in ids]
    detok_us = (time.perf_counter() - begin) / len(ids) * 1e6
    begin = time.perf_counter()
    for token, text in zip(ids, texts, strict=True):
        delta = pb.GenerateDelta(token_ids=[token], text=text)
        pb.GenerateResponse(delta=delta).SerializeToString()
    proto_us = (time.perf_counter() - begin) / len(ids) * 1e6
    return {"detokenize_us": detok_us, "protobuf_us": proto_us, "parser_us": parser_us_per_token()}


def offline_pairs(level: dict) -> dict:
    """The offline/gRPC pairs at one level, their median ratio and that pair's overhead."""
    if "grpc" not in level["protocols"]:
        return {"pairs_offline_grpc_tokens_per_s": None, "grpc_over_offline_median": None}
    offline = level["offline"]["tokens_per_s_rounds"]
    pairs = list(zip(offline, level["protocols"]["grpc"]["tokens_per_s_rounds"], strict=True))
    ratio = level["ratios"]["grpc/offline"]["median"]
    offline_rate, grpc_rate = next((o, g) for o, g in pairs if g / o == ratio)
    return {
        "pairs_offline_grpc_tokens_per_s": pairs,
        "grpc_over_offline_median": ratio,
        "server_overhead_us_per_token": (1 / grpc_rate - 1 / offline_rate) * 1e6,
    }


def print_table(result: dict) -> None:
    print(f"commit {result['commit']} on {result['machine']}, demo checkpoint, CPU")
    print(
        f"{result['output_tokens']} output tokens per stream, 2·c streams c at a time per run, "
        f"{result['rounds']} round(s) per concurrency (tok/s: median round; latencies pooled)"
    )
    print(
        "conc  protocol     tok/s   TTFT p50/p99 ms    ITL p50/p99 ms   CPU us/tok srv/cli  errors"
    )
    for level in result["levels"]:
        c, offline = level["concurrency"], level["offline"]
        print(
            f"{c:>4}  {'offline':<10} {offline['tokens_per_s']:7.1f}  {'':17}  {'':15}  "
            f"{offline['cpu_us_per_token']:7.0f}"
        )
        for protocol, r in level["protocols"].items():
            errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
            print(
                f"{c:>4}  {protocol:<10} {r['tokens_per_s']:7.1f}  "
                f"{r['ttft_p50_ms']:7.1f} /{r['ttft_p99_ms']:7.1f}  "
                f"{r['itl_p50_ms']:6.1f} /{r['itl_p99_ms']:6.1f}  "
                f"{r['server_cpu_us_per_token']:7.0f} /{r['client_cpu_us_per_token']:6.0f}  "
                f"{errors}"
            )
        ratios = "; ".join(
            f"{name} {v['median']:.2f} (" + " ".join(f"{x:.2f}" for x in v["rounds"]) + ")"
            for name, v in level["ratios"].items()
        )
        print(f"      {ratios}")
    if result["grpc_over_offline_median"] is not None:
        print(
            f"concurrency {result['ratio_concurrency']}, offline vs gRPC tok/s pairs: "
            + ", ".join(f"{o:.0f}/{g:.0f}" for o, g in result["pairs_offline_grpc_tokens_per_s"])
            + f"; median gRPC/offline = {result['grpc_over_offline_median']:.2f} (goal >= 0.90); "
            f"server overhead {result['server_overhead_us_per_token']:.0f} us/token "
            "(1/grpc - 1/offline; within this VM's noise when near 0)"
        )
    pieces = result["pieces_us_per_token"]
    print(
        f"per token: detokenize {pieces['detokenize_us']:.1f} us, protobuf delta "
        f"{pieces['protobuf_us']:.1f} us, stream parser {pieces['parser_us']:.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["grpc", "http"])
    ap.add_argument("--ratio-concurrency", type=int, default=32, help="also run when not listed")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument(
        "--threads",
        type=int,
        default=SERVER_THREADS,
        help=f"the offline engine's OpenMP threads (the server's: {SERVER_THREADS})",
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds per concurrency")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    protocols = list(dict.fromkeys(args.protocols))
    concurrencies = sorted({*args.concurrency, args.ratio_concurrency})

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the offline subprocesses inherit it
    process = start_server("--max-num-seqs", str(max(concurrencies)), "--http-port", "0")
    try:
        server = Server(process.target, process.http_base, process.proc.pid)
        for protocol in protocols:  # warm-up: first requests and connections of each kind
            asyncio.run(run_protocol(server, protocol, 1, args.output_tokens, requests=2))
        levels = []
        for c in concurrencies:
            rounds = [
                run_round(server, protocols, c, args.output_tokens, turn)
                for turn in range(args.repeat)
            ]
            levels.append(level_result(c, rounds, protocols))
    finally:
        process.terminate()
    ratio_level = next(lv for lv in levels if lv["concurrency"] == args.ratio_concurrency)
    result = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": (
            f"{platform.machine()} {os.cpu_count()} cpus; OpenMP threads: server "
            f"{SERVER_THREADS}, offline {args.threads}"
        ),
        "protocols": protocols,
        "output_tokens": args.output_tokens,
        "rounds": args.repeat,
        "levels": levels,
        "ratio_concurrency": args.ratio_concurrency,
        **offline_pairs(ratio_level),
        "pieces_us_per_token": per_token_pieces_us(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
