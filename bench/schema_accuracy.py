"""Tool-call schema accuracy through a real server, with guided decoding on and off.

    python bench/schema_accuracy.py [--target HOST:PORT] [--concurrency 32] [--failures]

Without ``--target`` it starts ``kimi-grpc serve`` on the demo checkpoint (random weights, CPU).
``tests/test_guided_accuracy.py`` runs the same measurement and asserts on it.

Method, after K2 Vendor Verifier's ``schema_accuracy``. Every case of the tool-call corpus
(``tests/guided_corpus.py``: 240 chats of 1 to 30 tools) is sent once as an AgentStep with a (mode,
tool_choice, temperature) combination assigned by rotation, so each of the 18 combinations (INSTANT
/ THINKING / AGENT × required / named / auto × temperature 0 / 1) gets 13 or 14 cases. A named
tool_choice names one of the case's tools (rotating); every fourth round of the rotation sets
``parallel_tool_calls=false``; THINKING and AGENT get a small thinking budget, so the random
model's reasoning ends (the server forces ``</think>``); temperature 1 is seeded. A response counts
when its finish reason is TOOL_CALLS, and is valid when it has no parse errors and every call names
a tool declared in that request with ``json.loads(arguments)`` valid for that tool's ``parameters``
(``jsonschema`` Draft 2020-12 with its format checker; a format whose checker needs a package that
is not installed gets an RFC-shaped regular expression instead). Schema accuracy = valid / counted.
Like K2VV, every call is checked against its tool's declared ``parameters``: the tools go out
without the corpus's ``strict: false`` flags (a ``strict: false`` tool is promised only a JSON
object, OpenAI's semantics, which the grammar tests cover). The same requests are then sent
with ``guided_decoding=false``, which shows what the grammar is worth and keeps the guided number
from passing vacuously. Both runs also report accuracy over every response with any tool-call
output (a call cut off by ``max_tokens`` counts there, as invalid).

Why the logit biases are legitimate. A random-weights model almost never closes a JSON string or
emits a tool marker by chance, so without help nearly every call would run into ``max_tokens``
(finish LENGTH) and never count. Every request therefore biases the tokens that close JSON values
(``"``, ``"}``, ``}``, ``]``, ``,``), the tool-call markers ``<|tool_call_begin|>``,
``<|tool_call_end|>`` and ``<|tool_calls_section_end|>`` (opening another call as likely as closing
the section, so parallel calls happen where they are allowed) and ``<|im_end|>`` up; tool_choice
auto also biases ``<|tool_calls_section_begin|>`` (so calls happen); whitespace-only tokens are
biased down (the grammar allows up to 32 whitespace characters per JSON gap, which a random model
otherwise fills). A bias only reweights logits: the grammar's mask is applied to the raw logits and
removes every token it refuses whatever its bias, so biasing can make a valid call likelier but
never makes an invalid one possible. Guided on and off get the same biases, so the comparison
isolates the grammar.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import jsonschema  # noqa: E402

from kimi_grpc.client import CLIENT_OPTIONS, chat_message  # noqa: E402
from kimi_grpc.client import tool as proto_tool  # noqa: E402
from kimi_grpc.proto import inference_pb2 as pb  # noqa: E402
from kimi_grpc.proto import inference_pb2_grpc as pb_grpc  # noqa: E402
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir  # noqa: E402
from tests.guided_corpus import CorpusCase, corpus  # noqa: E402

MODES = (("instant", pb.MODE_INSTANT), ("thinking", pb.MODE_THINKING), ("agent", pb.MODE_AGENT))
CHOICES = ("required", "named", "auto")
TEMPERATURES = (0.0, 1.0)
COMBOS = list(itertools.product([m for m, _ in MODES], CHOICES, TEMPERATURES))
MODE_IDS = dict(MODES)
MAX_TOKENS = 160
THINKING_BUDGET = 6
SEED = 1234
SERIAL_EVERY = 4  # every fourth round of the rotation sets parallel_tool_calls=false
# Logit biases (text or special-token name -> bias); see the module docstring.
BIASES: dict[str, float] = {
    '"': 6.0,
    '"}': 6.0,
    "}": 6.0,
    "]": 6.0,
    ",": 3.0,
    "<|tool_call_begin|>": 12.0,  # after a call: another one (parallel calls) or the section end
    "<|tool_call_end|>": 12.0,
    "<|tool_calls_section_end|>": 12.0,
    "<|im_end|>": 10.0,
}
AUTO_BIASES: dict[str, float] = {"<|tool_calls_section_begin|>": 14.0}  # tool_choice auto only
WHITESPACE_BIAS = -6.0  # every token made only of JSON whitespace
# Parser notes that are not schema failures (the call itself is intact).
BENIGN_PARSE_ERROR = re.compile(r"^duplicate tool call id \S+ renumbered to :\d+$")
ANY_OBJECT = {"type": "object"}


def bias_ids(tokenizer: KimiTokenizer, *, auto: bool) -> dict[int, float]:
    """The request's ``logit_bias``: :data:`BIASES` (plus :data:`AUTO_BIASES` for tool_choice
    auto) as token ids, and :data:`WHITESPACE_BIAS` on the whitespace-only tokens."""
    out: dict[int, float] = {}
    for token in range(tokenizer.num_base_tokens):
        if set(tokenizer.token_bytes(token)) <= set(b" \t\n\r"):
            out[token] = WHITESPACE_BIAS
    for text, value in (BIASES | AUTO_BIASES if auto else BIASES).items():
        special = tokenizer.token_id(text)
        ids = [special] if special is not None else tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"bias entry {text!r} is not one token: {ids}")
        out[ids[0]] = value
    return out


@dataclass(frozen=True)
class Spec:
    """One request of the run: a corpus case and how it is sent."""

    case: CorpusCase
    mode: str
    choice: str  # "required", "named" or "auto"
    temperature: float
    named: str | None  # the tool a named choice names
    parallel: bool

    @property
    def combo(self) -> tuple[str, str, float]:
        return (self.mode, self.choice, self.temperature)

    def tools(self) -> list[dict]:
        """The case's tools as K2VV sends them: a ``strict: false`` flag is left out, so every
        declared schema is enforced and checked."""
        out = []
        for tool in self.case.tools:
            fn = {k: v for k, v in tool["function"].items() if k != "strict" or v is not False}
            out.append({**tool, "function": fn})
        return out

    def schemas(self) -> dict[str, dict]:
        """Declared name -> the schema its arguments must satisfy."""
        return {
            t["function"]["name"]: t["function"].get("parameters") or ANY_OBJECT
            for t in self.tools()
        }


def specs(cases: list[CorpusCase] | None = None) -> list[Spec]:
    """Every case once, combinations assigned by rotation (``i % 18``)."""
    cases = corpus() if cases is None else cases
    out = []
    for i, case in enumerate(cases):
        mode, choice, temperature = COMBOS[i % len(COMBOS)]
        names = [t["function"]["name"] for t in case.tools]
        named = names[(i // len(COMBOS)) % len(names)] if choice == "named" else None
        parallel = (i // len(COMBOS)) % SERIAL_EVERY != 1
        out.append(Spec(case, mode, choice, temperature, named, parallel))
    return out


def request(
    spec: Spec, index: int, *, guided: bool, biases: dict[bool, dict[int, float]]
) -> pb.AgentStepRequest:
    """The AgentStep for ``spec``; ``biases``: auto? -> logit_bias (see :func:`bias_ids`)."""
    sampling = pb.SamplingParams(temperature=spec.temperature, max_tokens=MAX_TOKENS, seed=SEED)
    for token, value in biases[spec.choice == "auto"].items():
        sampling.logit_bias[token] = value
    req = pb.AgentStepRequest(
        request_id=f"accuracy-{'on' if guided else 'off'}-{index:03d}",
        messages=[chat_message(m) for m in spec.case.messages],
        tools=[proto_tool(t) for t in spec.tools()],
        mode=MODE_IDS[spec.mode],
        sampling=sampling,
        final_only=True,
        guided_decoding=guided,
    )
    if spec.choice == "named":
        req.tool_choice.function_name = spec.named
    elif spec.choice == "required":
        req.tool_choice.mode = pb.TOOL_CHOICE_MODE_REQUIRED
    else:
        req.tool_choice.mode = pb.TOOL_CHOICE_MODE_AUTO
    if spec.mode != "instant":
        req.thinking_budget = THINKING_BUDGET
    if not spec.parallel:
        req.parallel_tool_calls = False
    return req


# Formats whose jsonschema checker needs an optional package (rfc3339-validator, fqdn,
# rfc3987...) get these RFC-shaped fallbacks when it is missing, so every format the corpus uses
# is checked.
_HOUR_MINUTE_SECOND = r"(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d+)?"
_TIME = rf"{_HOUR_MINUTE_SECOND}(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"  # RFC 3339 full-time
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FALLBACK_FORMATS: dict[str, re.Pattern] = {
    "date-time": re.compile(rf"\d{{4}}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])[Tt ]{_TIME}"),
    "time": re.compile(_TIME),
    "hostname": re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?"),
    "uri": re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]*"),
}


def format_checker() -> jsonschema.FormatChecker:
    """Draft 2020-12's format checker plus :data:`FALLBACK_FORMATS` where it lacks them."""
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
    for name, pattern in FALLBACK_FORMATS.items():
        if name not in checker.checkers:
            checker.checks(name)(
                lambda value, p=pattern: not isinstance(value, str) or bool(p.fullmatch(value))
            )
    return checker


FORMAT_CHECKER = format_checker()
_VALIDATORS: dict[str, Any] = {}


def _validator(schema: dict) -> Any:
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        jsonschema.Draft202012Validator.check_schema(schema)
        _VALIDATORS[key] = jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
    return _VALIDATORS[key]


def call_problems(spec: Spec, final: pb.AgentStepFinal) -> list[str]:
    """Why this response's tool calls are not all schema-valid (empty: they are). Parse errors
    count (a truncated or malformed call), except the benign id-renumbering note."""
    problems = [f"parse error: {e}" for e in final.parse_errors if not BENIGN_PARSE_ERROR.match(e)]
    schemas = spec.schemas()
    for call in final.message.tool_calls:
        if call.name not in schemas:
            problems.append(f"{call.name!r} is not a declared tool")
            continue
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError as exc:
            problems.append(f"{call.name}: arguments are not JSON ({exc}): {call.arguments!r}")
            continue
        for error in _validator(schemas[call.name]).iter_errors(arguments):
            where = "/".join(map(str, error.absolute_path)) or "(root)"
            problems.append(f"{call.name}: {where}: {error.message} in {call.arguments!r}")
    return problems


def choice_problems(spec: Spec, final: pb.AgentStepFinal) -> list[str]:
    """tool_choice / parallel_tool_calls violations (for a TOOL_CALLS response)."""
    names = [c.name for c in final.message.tool_calls]
    problems = []
    if spec.choice == "named" and names != [spec.named]:
        problems.append(f"tool_choice {spec.named!r} wants exactly that one call, got {names}")
    if spec.choice == "required" and not names:
        problems.append("tool_choice required: no call")
    if not spec.parallel and len(names) > 1:
        problems.append(f"parallel_tool_calls=false: {len(names)} calls")
    return problems


@dataclass
class Outcome:
    """One response, scored."""

    spec: Spec
    final: pb.AgentStepFinal | None = None
    error: str | None = None  # the RPC failed
    problems: list[str] = field(default_factory=list)  # call_problems

    def score(self) -> None:
        if self.final is not None:
            self.problems = call_problems(self.spec, self.final)

    @property
    def finish(self) -> str:
        return pb.FinishReason.Name(self.final.finish_reason)[14:] if self.final else "RPC_ERROR"

    @property
    def tool_calls(self) -> bool:
        """Counted by K2VV's schema_accuracy: finish reason TOOL_CALLS."""
        return self.finish == "TOOL_CALLS"

    @property
    def attempted(self) -> bool:
        """Any tool-call output: a parsed call or a parse error about calls, whatever the finish
        reason (a call cut by max_tokens counts, as invalid)."""
        if self.final is None:
            return False
        errors = [e for e in self.final.parse_errors if "tool" in e]
        return bool(self.final.message.tool_calls) or bool(errors)


def _ratio(part: int, whole: int) -> str:
    return f"{part}/{whole} = {part / whole:.1%}" if whole else f"{part}/0"


@dataclass
class Report:
    guided: bool
    outcomes: list[Outcome]
    seconds: float

    @property
    def counted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.tool_calls]

    @property
    def valid(self) -> list[Outcome]:
        return [o for o in self.counted if not o.problems]

    @property
    def accuracy(self) -> float:
        """K2VV's schema_accuracy: valid / TOOL_CALLS responses."""
        return len(self.valid) / len(self.counted) if self.counted else float("nan")

    @property
    def attempted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.attempted]

    @property
    def attempted_accuracy(self) -> float:
        """Valid / responses with any tool-call output (any finish reason)."""
        valid = sum(not o.problems for o in self.attempted)
        return valid / len(self.attempted) if self.attempted else float("nan")

    def calls_per_response(self) -> Counter:
        """Number of calls -> TOOL_CALLS responses with that many."""
        return Counter(len(o.final.message.tool_calls) for o in self.counted)

    def failures(self) -> list[str]:
        """RPC errors, and TOOL_CALLS responses with schema or tool_choice problems."""
        out = []
        for o in self.outcomes:
            where = f"{o.spec.case.name} {o.spec.combo} parallel={o.spec.parallel}"
            if o.final is None:
                out.append(f"{where}: RPC error {o.error}")
            elif o.tool_calls:
                problems = choice_problems(o.spec, o.final) + o.problems
                if problems:
                    more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
                    out.append(f"{where}: {problems[:6]}{more}")
        return out

    def per_combo(self) -> dict[tuple[str, str, float], tuple[int, int, int]]:
        """combo -> (requests, TOOL_CALLS responses, valid ones)."""
        table = {c: [0, 0, 0] for c in COMBOS}
        for o in self.outcomes:
            row = table[o.spec.combo]
            row[0] += 1
            row[1] += o.tool_calls
            row[2] += o.tool_calls and not o.problems
        return {c: (n, calls, valid) for c, (n, calls, valid) in table.items()}

    def summary(self) -> str:
        attempted = self.attempted
        finishes = Counter(o.finish for o in self.outcomes)
        lines = [
            f"guided decoding {'on' if self.guided else 'off'}: {len(self.outcomes)} requests "
            f"in {self.seconds:.1f}s; finish reasons {dict(sorted(finishes.items()))}",
            "  schema accuracy over TOOL_CALLS responses: "
            + _ratio(len(self.valid), len(self.counted)),
            "  over every response with tool-call output (any finish): "
            + _ratio(sum(not o.problems for o in attempted), len(attempted)),
            f"  calls per TOOL_CALLS response: {dict(sorted(self.calls_per_response().items()))}",
            "  mode      tool_choice  temperature  requests  TOOL_CALLS  valid",
        ]
        for (mode, choice, temp), (n, calls, valid) in self.per_combo().items():
            lines.append(f"  {mode:9} {choice:12} {temp:11.1f}  {n:8}  {calls:10}  {valid:5}")
        return "\n".join(lines)


async def run(
    target: str,
    plan: list[Spec],
    *,
    guided: bool,
    biases: dict[bool, dict[int, float]],
    concurrency: int = 32,
    timeout: float = 600.0,
) -> Report:
    """Sends every spec (``concurrency`` at a time) and scores the answers."""
    gate = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    async with grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(index: int, spec: Spec) -> Outcome:
            outcome = Outcome(spec)
            req = request(spec, index, guided=guided, biases=biases)
            async with gate:
                try:
                    async for response in stub.AgentStep(req, timeout=timeout):
                        if response.HasField("final"):
                            outcome.final = response.final
                except grpc.aio.AioRpcError as exc:
                    outcome.error = f"{exc.code().name}: {exc.details()}"
            outcome.score()
            return outcome

        outcomes = await asyncio.gather(*(one(i, s) for i, s in enumerate(plan)))
    return Report(guided, list(outcomes), time.monotonic() - start)


def all_biases(tokenizer: KimiTokenizer) -> dict[bool, dict[int, float]]:
    return {auto: bias_ids(tokenizer, auto=auto) for auto in (False, True)}


async def measure(target: str, concurrency: int = 32) -> tuple[Report, Report]:
    """The corpus with guided decoding on, then the same requests with it off."""
    biases = all_biases(KimiTokenizer.from_dir(demo_tokenizer_dir()))
    plan = specs()
    on = await run(target, plan, guided=True, biases=biases, concurrency=concurrency)
    off = await run(target, plan, guided=False, biases=biases, concurrency=concurrency)
    return on, off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="a running server (default: start one on the demo model)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--failures", action="store_true", help="list every failing response")
    args = ap.parse_args()
    server = None
    if args.target is None:
        from tests.server_harness import start_server

        server = start_server("--max-num-seqs", "64")
    try:
        target = args.target or server.target
        on, off = asyncio.run(measure(target, args.concurrency))
    finally:
        if server is not None:
            server.terminate()
    for report in (on, off):
        print(report.summary())
        if args.failures:
            print("\n".join("  " + f for f in report.failures()))


if __name__ == "__main__":
    main()
