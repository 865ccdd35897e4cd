"""Moonshot's kimi-cli (1.49.0, its own venv from ``scripts/kimi_cli_venv.sh``) in print mode
(``--print --no-thinking --output-format stream-json``) against a real ``kimi-grpc serve
--http-port`` on the demo checkpoint: a plain run ends with a text answer, and a run whose first
step is forced to call kimi-cli's ``Shell`` tool executes a harmless command and answers after
the tool result.

kimi-cli talks to the server through ``GuardProxy``, a pass-through HTTP proxy in this process.
It exists because the demo weights are random: under kimi-cli's ``tool_choice`` (never sent, so
auto) the model may pick any of kimi-cli's 15 tools with schema-valid but random arguments (a
random ``Shell`` command, a ``WriteFile`` to a random path), and print mode executes tool calls
without asking. kimi-cli has no setting that adds body fields (only headers), so the server
cannot be told to force or forbid tools. The proxy

- records every request body kimi-cli sends and the server's streamed answer;
- withholds the server's tool-call chunks until the answer ends and passes them on only when
  every call is one the test allows; otherwise it drops them (kimi-cli never sees the call) and
  the test fails, naming the call;
- in the Shell run only, rewrites the requests: the ``Shell`` tool's declared schema becomes one
  whose ``command`` is an ``enum`` of one harmless command (guided decoding then generates exactly
  it); the first step gets ``tool_choice`` naming ``Shell``, ``parallel_tool_calls: false`` and a
  ``logit_bias`` against whitespace-only tokens (keeps the arguments' JSON short), and the step
  after the tool result ``tool_choice: "none"`` and ``min_tokens: 1``, so it answers in text.

The plain run only adds ``tool_choice: "none"`` (kimi-cli sends none, i.e. auto): its greedy
answer is not always the same text, because kimi-cli's system prompt holds the current time and
the work dir. Over 70 such prompts no answer started a tool call (``<|tool_calls_section_begin|>``
ranks ~10th, 1.5 nats below the top), but "rarely" is not good enough for CI; the checks on what
kimi-cli sent use the body as received, before the rewrite.

kimi-cli runs with HOME, its share dir and its work dir in tmp_path, telemetry and auto-update
off. Its first request is ~19k demo-tokenizer tokens (13k of tool declarations, rendered first,
then the system prompt), so the module's runtime is mostly CPU prefill (~15 s for the first).
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import os
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.server_harness import ServerProcess, running_server

REPO = Path(__file__).resolve().parent.parent
MODEL = "kimi-grpc-demo"
# The plain run's answer: few tokens, few chances for the random model to start a tool call.
MAX_COMPLETION_TOKENS = 8
SHELL_MAX_COMPLETION_TOKENS = 64  # the Shell run: the call takes ~45 tokens
KIMI_TIMEOUT_S = 300
# Bash evaluates $((6*7)), so the output (42) is not in the command text: seeing it proves the
# command ran.
SHELL_COMMAND = "echo kimi-grpc-shell-$((6*7))"
SHELL_OUTPUT = "kimi-grpc-shell-42"
KIMI_CLI_TOOLS = 15  # what kimi-cli 1.49.0's default agent declares


# ---- the guard proxy ----------------------------------------------------------------------------

Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Exchange:
    """One POST through the proxy: what kimi-cli sent, what went upstream, what came back."""

    received: dict[str, Any]
    sent: dict[str, Any]
    status: int = 0
    content: str = ""  # concatenated delta.content of the stream
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # id, name, arguments
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error_body: str = ""  # a non-200 answer


class GuardProxy:
    """Forwards ``POST /v1/...`` to ``upstream``; see the module docstring."""

    def __init__(
        self,
        upstream: str,
        rewrite: Rewrite | None = None,
        allowed_calls: tuple[tuple[str, dict[str, Any]], ...] = (),
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rewrite = rewrite
        self.allowed_calls = allowed_calls
        self.exchanges: list[Exchange] = []
        self.blocked: list[str] = []  # tool calls withheld from kimi-cli
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> GuardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _allowed(self, call: dict[str, str]) -> bool:
        try:
            arguments = json.loads(call["arguments"])
        except ValueError:
            return False
        return (call["name"], arguments) in self.allowed_calls

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers["Content-Length"]))
        received = json.loads(raw)
        sent = received
        if self.rewrite is not None:
            sent = self.rewrite(copy.deepcopy(received))
            raw = json.dumps(sent).encode()
        exchange = Exchange(received=received, sent=sent)
        self.exchanges.append(exchange)
        skip = {"host", "content-length", "connection", "accept-encoding"}
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
        conn = http.client.HTTPConnection(*self.upstream, timeout=KIMI_TIMEOUT_S)
        try:
            conn.request("POST", handler.path, raw, headers)
            resp = conn.getresponse()
            exchange.status = resp.status
            handler.send_response(resp.status)
            handler.send_header("Content-Type", resp.getheader("Content-Type", ""))
            handler.end_headers()  # HTTP/1.0: the body ends when the connection closes
            if resp.status != 200 or not resp.getheader("Content-Type", "").startswith(
                "text/event-stream"
            ):
                body = resp.read()
                exchange.error_body = body.decode(errors="replace")
                handler.wfile.write(body)
                return
            self._relay_stream(resp, handler, exchange)
        finally:
            conn.close()

    def _relay_stream(
        self, resp: http.client.HTTPResponse, handler: BaseHTTPRequestHandler, ex: Exchange
    ) -> None:
        held: list[bytes] | None = None  # from the first tool-call chunk to the end
        calls: dict[int, dict[str, str]] = {}
        for line in resp:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[len(b"data: ") :])
                if chunk.get("usage"):
                    ex.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    ex.content += delta.get("content") or ""
                    for part in delta.get("tool_calls") or []:
                        call = calls.setdefault(
                            part["index"], {"id": "", "name": "", "arguments": ""}
                        )
                        call["id"] += part.get("id") or ""
                        function = part.get("function") or {}
                        call["name"] += function.get("name") or ""
                        call["arguments"] += function.get("arguments") or ""
                        if held is None:
                            held = []
                    if choice.get("finish_reason"):
                        ex.finish_reasons.append(choice["finish_reason"])
            if held is not None:
                held.append(line)
            else:
                handler.wfile.write(line)
                handler.wfile.flush()
        ex.tool_calls = [calls[i] for i in sorted(calls)]
        if held is None:
            return
        refused = [c for c in ex.tool_calls if not self._allowed(c)]
        if refused:  # kimi-cli gets a stream cut before the calls and never runs them
            self.blocked.extend(f"{c['name']}({c['arguments']})" for c in refused)
            return
        handler.wfile.write(b"".join(held))
        handler.wfile.flush()


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kimi_exe() -> str:
    """kimi-cli's executable; the Makefile's test target installs it first, so this is ~0.3 s."""
    try:
        done = subprocess.run(
            ["bash", "scripts/kimi_cli_venv.sh"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        pytest.fail(
            f"scripts/kimi_cli_venv.sh failed (exit {e.returncode}):\n{e.stdout}\n{e.stderr}"
        )
    lines = done.stdout.strip().splitlines()
    exe = lines[-1] if lines else ""
    assert os.access(exe, os.X_OK), f"not an executable: {exe!r}; output:\n{done.stdout}"
    return exe


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--http-port", "0") as srv:
        yield srv


@pytest.fixture(scope="module")
def context_length(server: ServerProcess) -> int:
    """The window /v1/models reports, which kimi-cli's config gets as max_context_size."""
    with urllib.request.urlopen(server.http_base + "/models", timeout=30) as resp:
        models = json.load(resp)
    (entry,) = [m for m in models["data"] if m["id"] == MODEL]
    # Below ~64k kimi-cli compacts before the first step (its reserve is 50k tokens) and sends
    # the system prompt without the user's message.
    assert entry["context_length"] >= 65536, entry
    return entry["context_length"]


@dataclass
class KimiRun:
    returncode: int
    stdout: str
    stderr: str
    messages: list[dict[str, Any]]  # the stream-json lines

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-3000:]}"


def run_kimi(
    exe: str, base_url: str, max_context: int, tmp: Path, prompt: str, max_tokens: int
) -> KimiRun:
    """One ``kimi --print`` run, isolated in ``tmp`` (work dir, HOME, share dir)."""
    work, home = tmp / "work", tmp / "home"
    work.mkdir()
    home.mkdir()
    config = tmp / "config.toml"
    config.write_text(
        f"""default_model = "demo"
default_thinking = false
telemetry = false

[providers.local]
type = "kimi"
base_url = "{base_url}"
api_key = "dummy"

[models.demo]
provider = "local"
model = "{MODEL}"
max_context_size = {max_context}
"""
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("KIMI_")
    }
    env.update(
        HOME=str(home),
        KIMI_SHARE_DIR=str(tmp / "share"),
        KIMI_CLI_NO_AUTO_UPDATE="1",
        KIMI_DISABLE_TELEMETRY="1",
        KIMI_MODEL_TEMPERATURE="0",
        KIMI_MODEL_MAX_COMPLETION_TOKENS=str(max_tokens),
        NO_PROXY="127.0.0.1,localhost",
    )
    cmd = [exe, "--config-file", str(config), "-w", str(work), "--print", "--no-thinking"]
    cmd += ["--output-format", "stream-json", "-p", prompt]
    done = subprocess.run(
        cmd,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=KIMI_TIMEOUT_S,
    )
    # Errors come as plain text on stdout; only JSON lines are messages.
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return KimiRun(done.returncode, done.stdout, done.stderr, messages)


def check_kimi_request(body: dict[str, Any], max_tokens: int) -> None:
    """What kimi-cli's print mode sends with --no-thinking and the env above."""
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["thinking"] == {"type": "disabled"}
    assert body["temperature"] == 0
    assert body["max_completion_tokens"] == max_tokens
    assert isinstance(body["prompt_cache_key"], str) and body["prompt_cache_key"]
    assert "tool_choice" not in body
    names = [t["function"]["name"] for t in body["tools"]]
    assert len(names) == KIMI_CLI_TOOLS and "Shell" in names, names


def check_answer(ex: Exchange, max_tokens: int) -> None:
    assert ex.status == 200, ex.error_body
    assert ex.finish_reasons and ex.finish_reasons[-1] in ("stop", "length"), ex.finish_reasons
    assert ex.usage is not None and 0 < ex.usage["completion_tokens"] <= max_tokens


# ---- tests --------------------------------------------------------------------------------------


def test_print_mode_answers_text(
    kimi_exe: str, server: ServerProcess, context_length: int, tmp_path: Path
) -> None:
    no_tools = {"tool_choice": "none"}  # random weights: never let it pick one of 15 tools
    with GuardProxy(server.http_base, rewrite=lambda body: {**body, **no_tools}) as proxy:
        run = run_kimi(
            kimi_exe, proxy.base_url, context_length, tmp_path, "Say hello", MAX_COMPLETION_TOKENS
        )
    assert not proxy.blocked, f"the model called tools (withheld from kimi-cli): {proxy.blocked}"
    assert run.returncode == 0, run.describe()
    assert len(proxy.exchanges) == 1, run.describe()
    (ex,) = proxy.exchanges
    check_kimi_request(ex.received, MAX_COMPLETION_TOKENS)
    assert [m["role"] for m in ex.received["messages"]] == ["system", "user"]
    assert ex.received["messages"][1]["content"] == "Say hello"
    check_answer(ex, MAX_COMPLETION_TOKENS)
    assert ex.tool_calls == []
    # One assistant message, plain text (a string, not parts): what the server streamed.
    assert run.messages == [{"role": "assistant", "content": ex.content}], run.describe()
    assert ex.content.strip()


@functools.cache
def whitespace_bias() -> dict[str, float]:
    """-100 on the demo vocabulary's whitespace-only tokens: guided decoding allows up to 32
    whitespace characters between JSON tokens, and a random model takes them (the call's
    arguments then outgrow the token budget); the grammar still decides what is valid."""
    tok = KimiTokenizer.from_dir(demo_tokenizer_dir())
    ids = [i for i in range(tok.vocab_size) if (t := tok.decode([i])) and not t.strip()]
    return {str(i): -100.0 for i in ids}


def force_shell(body: dict[str, Any]) -> dict[str, Any]:
    """The Shell run's rewrite (see the module docstring)."""
    (shell,) = [t for t in body["tools"] if t["function"]["name"] == "Shell"]
    shell["function"]["parameters"] = {
        "type": "object",
        "properties": {
            "command": {
                "type": "string",
                "enum": [SHELL_COMMAND],
                "description": "The command to execute.",
            }
        },
        "required": ["command"],
        "additionalProperties": False,
    }
    if any(m["role"] == "tool" for m in body["messages"]):
        body["tool_choice"] = "none"
        body["min_tokens"] = 1  # an empty answer would make kimi-cli retry and exit 75
    else:
        body["tool_choice"] = {"type": "function", "function": {"name": "Shell"}}
        body["parallel_tool_calls"] = False
        body["logit_bias"] = whitespace_bias()
    return body


def test_print_mode_runs_forced_shell_call(
    kimi_exe: str, server: ServerProcess, context_length: int, tmp_path: Path
) -> None:
    allowed = (("Shell", {"command": SHELL_COMMAND}),)
    with GuardProxy(server.http_base, rewrite=force_shell, allowed_calls=allowed) as proxy:
        run = run_kimi(
            kimi_exe,
            proxy.base_url,
            context_length,
            tmp_path,
            "Print the answer with echo.",
            SHELL_MAX_COMPLETION_TOKENS,
        )
    assert not proxy.blocked, f"tool calls withheld from kimi-cli: {proxy.blocked}"
    assert run.returncode == 0, run.describe()
    assert len(proxy.exchanges) == 2, run.describe()
    first, second = proxy.exchanges
    for ex in (first, second):
        check_kimi_request(ex.received, SHELL_MAX_COMPLETION_TOKENS)
        check_answer(ex, SHELL_MAX_COMPLETION_TOKENS)
    assert first.sent["tool_choice"] == {"type": "function", "function": {"name": "Shell"}}
    assert second.sent["tool_choice"] == "none"

    # Step 1: the server's Shell call, as kimi-cli printed it.
    (call,) = first.tool_calls
    assert call["name"] == "Shell" and json.loads(call["arguments"]) == {"command": SHELL_COMMAND}
    assert call["id"]
    assert len(run.messages) == 3, run.describe()
    assistant, tool, final = run.messages
    assert assistant["role"] == "assistant"
    (printed,) = assistant["tool_calls"]
    assert printed["id"] == call["id"] and printed["function"]["name"] == "Shell"
    assert json.loads(printed["function"]["arguments"]) == {"command": SHELL_COMMAND}

    # kimi-cli ran it: the tool message holds bash's output.
    assert tool["role"] == "tool" and tool["tool_call_id"] == call["id"]
    tool_text = "".join(p["text"] for p in tool["content"] if p["type"] == "text")
    assert SHELL_OUTPUT + "\n" in tool_text, tool
    assert "successfully" in tool_text, tool

    # Step 2: kimi-cli sent the call and its result back; the server answered in text.
    history = second.received["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "tool"]
    assert history[2]["tool_calls"][0]["id"] == call["id"]
    assert history[3]["tool_call_id"] == call["id"]
    assert SHELL_OUTPUT in json.dumps(history[3]["content"])
    assert second.received["prompt_cache_key"] == first.received["prompt_cache_key"]
    assert second.tool_calls == []
    assert final == {"role": "assistant", "content": second.content}, run.describe()
    assert second.content.strip()
