"""``kimi-grpc swarm``: run (or ``--resume``) a swarm against a server, with live progress.

    kimi-grpc swarm --target HOST:PORT --task "..." --tools tools.py --out RUN_DIR \
        [--max-parallel 300] [--max-steps 4000] [--json]
    kimi-grpc swarm --target HOST:PORT --resume RUN_DIR

``--decisions MODULE_OR_FILE:FACTORY`` replaces the model's decisions (see
kimi_grpc/swarm/decisions.py), e.g. ``kimi_grpc.swarm.decisions:ScriptedDecisions`` for demo
models; the factory is called with ``--decisions-args`` parsed as a JSON object of keywords.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kimi_grpc.client import AsyncKimiClient
from kimi_grpc.swarm.orchestrator import Progress, Swarm, SwarmConfig
from kimi_grpc.swarm.tools import ToolRegistry

REFRESH_S = 0.5


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swarm", help="run an agent swarm (plan, parallel tool loops, synthesis)")
    p.add_argument("--target", required=True, help="HOST:PORT of a running kimi-grpc server")
    p.add_argument("--api-key", help="bearer token (or env KIMI_GRPC_API_KEY)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="the task to split among sub-agents")
    what.add_argument("--resume", metavar="RUN_DIR", help="continue the run journaled in RUN_DIR")
    p.add_argument("--tools", help="tools file: Python (TOOLS = [...]) or a JSON command list")
    p.add_argument("--out", help="run directory (journal + report); default runs/<time>")
    p.add_argument("--max-parallel", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=4000, help="steps of all sub-agents")
    p.add_argument("--max-steps-per-agent", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096, help="per step")
    p.add_argument("--thinking-budget", type=int)
    p.add_argument("--system-prompt", help="sub-agents' system prompt")
    p.add_argument("--temperature", type=float)
    p.add_argument("--decisions", help="MODULE_OR_FILE:FACTORY replacing the model's decisions")
    p.add_argument("--decisions-args", default="{}", help="JSON keywords for the factory")
    p.add_argument("--json", action="store_true", help="print the final report as JSON only")


def _load_factory(spec: str) -> Any:
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"--decisions {spec!r}: expected MODULE_OR_FILE:FACTORY")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("kimi_swarm_decisions", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, attr)


def _show(progress: Progress, total: int, last: list[float]) -> None:
    now = time.monotonic()
    if now - last[0] < REFRESH_S:
        return
    last[0] = now
    line = (
        f"\r[swarm] running {progress.running:>3}  done {progress.done:>3}/{total}  "
        f"failed {progress.failed:>3}  steps {progress.steps:>5}  retries {progress.retries:>3}  "
        f"{progress.tokens_per_s:7.1f} tok/s"
    )
    print(line, end="", file=sys.stderr, flush=True)


def _summary(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [
        f"run {report['run_id']}: {report['outcomes']} in {report['wall_s']:.1f} s",
        f"steps {t['steps']}, retries {t['retries']}, tokens prompt {t['prompt_tokens']} "
        f"(cached {t['cached_tokens']}), completion {t['completion_tokens']}",
    ]
    for agent in report["agents"]:
        if agent["outcome"] != "done":
            lines.append(f"  agent {agent['index']}: {agent['outcome']} {agent['error']}")
    lines.append(f"answer: {report['answer']}")
    return "\n".join(lines)


def cmd_swarm(args: argparse.Namespace) -> int:
    run_dir = Path(args.resume or args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    tools = ToolRegistry.from_file(args.tools) if args.tools else ToolRegistry()
    config = SwarmConfig(
        max_parallel=args.max_parallel,
        max_steps=args.max_steps,
        max_steps_per_agent=args.max_steps_per_agent,
        max_tokens=args.max_tokens,
        thinking_budget=args.thinking_budget,
        sampling={} if args.temperature is None else {"temperature": args.temperature},
    )
    if args.system_prompt:
        config.system_prompt = args.system_prompt
    decisions = None
    if args.decisions:
        decisions = _load_factory(args.decisions)(**json.loads(args.decisions_args))
    api_key = args.api_key or os.environ.get("KIMI_GRPC_API_KEY")

    async def main() -> dict[str, Any]:
        async with AsyncKimiClient(args.target, api_key=api_key) as client:
            last = [0.0]
            swarm = Swarm(client, tools, run_dir, config, decisions=decisions)
            if not args.json:
                swarm.on_progress = lambda p: _show(p, len(swarm.state.agents), last)
            return await swarm.run(None if args.resume else args.task)

    report = asyncio.run(main())
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(file=sys.stderr)
        print(_summary(report))
        print(f"journal and report in {run_dir}")
    return 0 if report["done"] else 1
