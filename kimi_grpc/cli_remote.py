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
import mimetypes
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from kimi_grpc.client import KimiClient
from kimi_grpc.proto import inference_pb2 as pb

TOOL_TIMEOUT_S = 60.0
DIM, RESET = "\033[2m", "\033[0m"
MIB = 1024 * 1024


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="HOST:PORT of a running kimi-grpc server")
    p.add_argument("--api-key", help="bearer token (or env KIMI_GRPC_API_KEY)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--tls-ca", help="CA bundle for TLS")


class _MediaFile(argparse.Action):
    """``--image`` / ``--video``: appends ``(kind, path)`` to one list, so the files keep the
    order given across both flags."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), (self.const, values)])


def add_media_file_args(p: argparse.ArgumentParser, where: str) -> None:
    """``--image FILE`` / ``--video FILE`` (repeatable) -> ``args.media``: ``[(kind, path)]``."""
    for kind, article in (("image", "an"), ("video", "a")):
        p.add_argument(
            f"--{kind}",
            action=_MediaFile,
            const=kind,
            dest="media",
            default=[],
            metavar="FILE",
            help=f"attach {article} {kind} file to {where} (repeatable; images and videos keep "
            "the order given)",
        )


def media_part(kind: str, path: str, source: str) -> dict[str, Any]:
    """The content part of the image / video file at ``path``: its bytes, and the mime type its
    extension names when that is one of ``kind``'s (else empty: the server sniffs the bytes).
    An unreadable file: ValueError naming ``source`` (the flag or command) and the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{source} {path}: {exc.strerror or exc}") from None
    mime = mimetypes.guess_type(path)[0] or ""
    return {"type": kind, "data": data, "mime_type": mime if mime.startswith(f"{kind}/") else ""}


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.1f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:.1f} KiB"


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
    """Interactive chat. Lines: text = a user turn; /image PATH, /video PATH = attach a file to
    the next turn; /mode instant|thinking; /reset; /exit. ``--image`` / ``--video`` files go
    with the first turn. Attached files stay in the history, so every later turn sends them
    again (as OpenAI-style APIs do); a turn the server refuses is dropped with its files."""
    pending = [media_part(kind, path, f"--{kind}") for kind, path in args.media]
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
                pending.clear()
                continue
            if line.startswith("/mode"):
                mode = line.split(maxsplit=1)[-1].strip()
                if mode in ("instant", "thinking"):
                    args.mode = mode
                else:
                    print("usage: /mode instant|thinking", file=sys.stderr)
                continue
            command, _, path = line.partition(" ")
            if command in ("/image", "/video"):
                _attach(pending, command, path.strip())
                continue
            if not line.strip():
                continue
            content = [*pending, {"type": "text", "text": line}] if pending else line
            pending = []
            messages.append({"role": "user", "content": content})
            try:
                final = _stream_turn(client, messages, args)
            except grpc.RpcError as exc:
                messages.pop()
                _rpc_error("chat", exc)
                continue
            messages.append(_assistant_message(final))


def _attach(pending: list[dict[str, Any]], command: str, path: str) -> None:
    """``/image PATH`` / ``/video PATH``: queues the file for the next user turn."""
    if not path:
        print(f"usage: {command} PATH", file=sys.stderr)
        return
    try:
        part = media_part(command.removeprefix("/"), path, command)
    except ValueError as exc:
        print(f"kimi-grpc chat: {exc}", file=sys.stderr)
        return
    pending.append(part)
    print(
        f"attached {part['type']} {path} ({_size(len(part['data']))}) to the next message",
        file=sys.stderr,
    )


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
