"""CLI verbs that talk to a running server: ``generate --target``, ``chat``, ``agent``.

Tools for ``agent --tools FILE``: a JSON list of
``{"name", "description", "parameters": {JSON schema}, "command": ["argv", ...]}``. A call runs
the command with the call's JSON arguments on stdin; its stdout is the tool result. A failing
command (non-zero exit, timeout, missing program) becomes an error *result* for the model, never
a crash of the loop.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from kimi_grpc.client import KimiClient
from kimi_grpc.proto import inference_pb2 as pb

TOOL_TIMEOUT_S = 60.0
DIM, RESET = "\033[2m", "\033[0m"


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="HOST:PORT of a running kimi-grpc server")
    p.add_argument("--api-key", help="bearer token (or env KIMI_GRPC_API_KEY)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--tls-ca", help="CA bundle for TLS")


def _client(args: argparse.Namespace) -> KimiClient:
    import os

    api_key = args.api_key or os.environ.get("KIMI_GRPC_API_KEY")
    tls: bool | str = args.tls_ca or bool(args.tls)
    return KimiClient(args.target, api_key=api_key, tls=tls)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    if getattr(args, "stop", None):
        params["stop"] = args.stop
    if getattr(args, "ignore_eos", False):
        params["ignore_eos"] = True
    return params


def _rpc_error(command: str, exc: grpc.RpcError) -> int:
    print(f"kimi-grpc {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 3


def _reason(final: Any) -> str:
    return pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    final = None
    try:
        with _client(args) as client:
            for response in client.generate(prompt, _sampling(args)):
                if response.HasField("final"):
                    final = response.final
                elif args.json:
                    delta = response.delta
                    record = {"text": delta.text, "token_ids": list(delta.token_ids)}
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                else:
                    print(response.delta.text, end="", flush=True)
    except grpc.RpcError as exc:
        return _rpc_error("generate", exc)
    usage = final.usage
    if args.json:
        record = {
            "finish_reason": _reason(final),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "e2e_ms": round(final.timings.e2e_ms, 1),
        }
        print(json.dumps(record), flush=True)
    else:
        print()
        print(
            f"[{usage.completion_tokens} tokens, finish_reason={_reason(final)}, "
            f"ttft {final.timings.time_to_first_token_ms:.0f} ms]",
            file=sys.stderr,
        )
    return 0


def _stream_turn(client: KimiClient, messages: list[dict], args: argparse.Namespace, **kw: Any):
    """Streams one assistant turn to the terminal; returns the final AgentStepFinal."""
    final, in_reasoning = None, False
    budget = getattr(args, "thinking_budget", None)
    for response in client.agent_step(
        messages, mode=args.mode, params=_sampling(args), thinking_budget=budget, **kw
    ):
        if response.HasField("final"):
            final = response.final
            continue
        delta = response.delta
        if delta.reasoning and not args.hide_reasoning:
            print((DIM if not in_reasoning else "") + delta.reasoning, end="", flush=True)
            in_reasoning = True
        if delta.content:
            print((RESET + "\n" if in_reasoning else "") + delta.content, end="", flush=True)
            in_reasoning = False
    if in_reasoning:
        print(RESET, end="")
    print(flush=True)
    return final


def _assistant_message(final: Any) -> dict[str, Any]:
    msg = final.message
    out: dict[str, Any] = {"role": "assistant", "content": msg.content}
    if msg.HasField("reasoning_content"):
        out["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
            for c in msg.tool_calls
        ]
    return out


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat. Lines: text = a user turn; /mode instant|thinking; /reset; /exit."""
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    base = len(messages)
    interactive = sys.stdin.isatty()
    with _client(args) as client:
        while True:
            if interactive:
                print(f"[{args.mode}] > ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                del messages[base:]
                continue
            if line.startswith("/mode"):
                mode = line.split(maxsplit=1)[-1].strip()
                if mode in ("instant", "thinking"):
                    args.mode = mode
                else:
                    print("usage: /mode instant|thinking", file=sys.stderr)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            try:
                final = _stream_turn(client, messages, args)
            except grpc.RpcError as exc:
                messages.pop()
                _rpc_error("chat", exc)
                continue
            messages.append(_assistant_message(final))


# ---- agent ------------------------------------------------------------------------------------
def load_tools(path: str | Path) -> dict[str, dict[str, Any]]:
    """Tool name -> declaration with its ``command`` argv (see the module docstring)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--tools {path}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--tools {path}: expected a non-empty JSON list of tools")
    tools = {}
    for i, entry in enumerate(entries):
        command = entry.get("command") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"--tools {path}: entry {i} needs a string name")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) for a in command)
        ):
            raise ValueError(f"--tools {path}: {entry['name']}: command must be a list of strings")
        tools[entry["name"]] = entry
    return tools


def run_tool(tools: dict[str, dict[str, Any]], name: str, arguments: str) -> str:
    """Runs one tool call; every failure is returned as text for the model."""
    entry = tools.get(name)
    if entry is None:
        return f"error: unknown tool {name!r}; available: {sorted(tools)}"
    try:
        proc = subprocess.run(
            entry["command"], input=arguments, capture_output=True, text=True,
            timeout=TOOL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {name} could not run: {exc}"
    if proc.returncode != 0:
        return f"error: {name} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    return proc.stdout


def cmd_agent(args: argparse.Namespace) -> int:
    """A tool loop: AgentStep, run the calls, append results, repeat until no call is made."""
    tools = load_tools(args.tools)
    declarations = [
        {k: v for k, v in entry.items() if k in ("name", "description", "parameters")}
        for entry in tools.values()
    ]
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.task})
    with _client(args) as client:
        for step in range(args.max_steps):
            try:
                choice = args.tool_choice if step == 0 else None
                final = _stream_turn(client, messages, args, tools=declarations, tool_choice=choice)
            except grpc.RpcError as exc:
                return _rpc_error("agent", exc)
            messages.append(_assistant_message(final))
            calls = list(final.message.tool_calls)
            if args.json:
                record = {"step": step, "finish_reason": _reason(final)}
                record["tool_calls"] = [
                    {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
                ]
                print(json.dumps(record, ensure_ascii=False), flush=True)
            if not calls:
                return 0
            for problem in final.parse_errors:  # e.g. arguments cut by max_tokens
                print(f"kimi-grpc agent: warning: {problem}", file=sys.stderr)
            for c in calls:
                result = run_tool(tools, c.name, c.arguments)
                print(f"{DIM}[{c.id}] {c.name}({c.arguments}) -> {result[:200]!r}{RESET}")
                messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
    print(f"kimi-grpc agent: stopped after --max-steps {args.max_steps}", file=sys.stderr)
    return 1
