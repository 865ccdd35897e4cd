"""Schema accuracy 100% with guided decoding, on a random-weights model through a real server.

K2 Vendor Verifier's ``schema_accuracy`` (valid tool calls over responses that finish with
``tool_calls``) measured end to end: the 240-case tool-call corpus (``tests/guided_corpus.py``)
goes through one ``kimi-grpc serve`` (demo checkpoint, CPU) as AgentStep requests in INSTANT,
THINKING and AGENT modes with tool_choice required / named / auto at temperature 0 and 1 (every
one of the 18 combinations gets 13 or 14 cases; some set ``parallel_tool_calls=false``). Every
TOOL_CALLS response must name only declared tools, with arguments that validate against the
tool's schema with ``jsonschema`` (Draft 2020-12, format checker), and must obey tool_choice and
``parallel_tool_calls``.

The measurement lives in ``bench/schema_accuracy.py`` (also a script: ``python
bench/schema_accuracy.py``); its docstring gives the method in full. In short:

- Random weights almost never close a JSON string or emit a tool marker, so every request sets
  ``logit_bias`` up on the tokens that close JSON values, on the tool-call markers and
  ``<|im_end|>`` (for tool_choice auto also on the section opener) and down on whitespace.
  That is legitimate: the grammar's mask is applied to the raw logits and removes every token
  it refuses whatever its bias, so a bias can make a valid call likelier but never an invalid
  one possible.
- It cannot pass vacuously: at least 60% of the guided requests must finish with TOOL_CALLS,
  every combination must produce some, parallel calls must occur where they are allowed, and
  the same requests with ``guided_decoding=false`` (same biases, same seeds) are measured too
  and must be far from 100% (both over TOOL_CALLS responses and over every response with any
  tool-call output).
- Afterwards the server's guided-decoding counters must show every guided request ran with a
  grammar (the unguided ones without), no token was ever refused by a grammar, and every KV
  page is free again.

Run with ``-s`` to see both accuracies and the per-combination table.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, replace

import pytest

from bench import schema_accuracy as sa
from kimi_grpc.client import KimiClient
from kimi_grpc.proto import inference_pb2 as pb
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.server_harness import start_server

CONCURRENCY = 32
MIN_CASES = 200  # guided requests, all told
MIN_PER_COMBO = 10  # requests per (mode, tool_choice, temperature)
MIN_TOOL_CALLS_SHARE = 0.6  # of the guided requests, finishing with TOOL_CALLS
MIN_TOOL_CALLS_PER_COMBO = 3
MIN_UNGUIDED_ATTEMPTS = 120  # unguided responses with tool-call output
MAX_UNGUIDED_ACCURACY = 0.5


@dataclass
class Measured:
    plan: list[sa.Spec]
    on: sa.Report
    off: sa.Report
    before: pb.GetServerStatusResponse  # fresh server
    between: pb.GetServerStatusResponse  # after the guided run
    after: pb.GetServerStatusResponse  # after the unguided run, idle
    seconds: float


def _idle_status(client: KimiClient, timeout: float = 30.0) -> pb.GetServerStatusResponse:
    """Server status once nothing runs and every KV page is free (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.server_status()
        idle = status.running == status.waiting == status.kv_pages_used == 0
        if idle or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.fixture(scope="module")
def measured() -> Measured:
    start = time.monotonic()
    biases = sa.all_biases(KimiTokenizer.from_dir(demo_tokenizer_dir()))
    plan = sa.specs()
    server = start_server("--max-num-seqs", "64")
    try:
        with KimiClient(server.target) as client:
            before = client.server_status()
            on = asyncio.run(
                sa.run(server.target, plan, guided=True, biases=biases, concurrency=CONCURRENCY)
            )
            between = _idle_status(client)
            off = asyncio.run(
                sa.run(server.target, plan, guided=False, biases=biases, concurrency=CONCURRENCY)
            )
            after = _idle_status(client)
    finally:
        server.terminate()
    result = Measured(plan, on, off, before, between, after, time.monotonic() - start)
    print(f"\n{on.summary()}\n{off.summary()}\nwhole measurement: {result.seconds:.1f}s")
    return result


def test_the_plan_covers_every_combination() -> None:
    plan = sa.specs()
    assert len(plan) >= MIN_CASES
    per_combo = Counter(spec.combo for spec in plan)
    assert set(per_combo) == set(sa.COMBOS) and len(sa.COMBOS) == 18
    assert min(per_combo.values()) >= MIN_PER_COMBO, per_combo
    serial = Counter(spec.combo for spec in plan if not spec.parallel)
    assert set(serial) == set(sa.COMBOS)  # parallel_tool_calls=false in every combination
    for spec in plan:
        declared = [t["function"]["name"] for t in spec.case.tools]
        assert (spec.named in declared) if spec.choice == "named" else spec.named is None
    # The named tool rotates through the case's tools (not always the first declared).
    firsts = [spec.named == spec.case.tools[0]["function"]["name"] for spec in plan if spec.named]
    assert 0 < sum(firsts) < len(firsts)


def _final(*calls: tuple[str, str], errors: tuple[str, ...] = ()) -> pb.AgentStepFinal:
    tool_calls = [pb.ToolCall(name=name, arguments=arguments) for name, arguments in calls]
    return pb.AgentStepFinal(
        message=pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=tool_calls),
        finish_reason=pb.FINISH_REASON_TOOL_CALLS,
        parse_errors=errors,
    )


def test_the_checker_accepts_golden_calls_and_rejects_broken_ones() -> None:
    """The scoring is not vacuous: the corpus's golden calls pass, broken ones fail."""
    plan = sa.specs()
    for spec in plan:
        for name, arguments in spec.case.example_calls:
            assert sa.call_problems(spec, _final((name, json.dumps(arguments)))) == []
    spec, name, arguments = next(
        (spec, name, arguments)
        for spec in plan
        for name, arguments in spec.case.example_calls
        if spec.schemas()[name].get("required")
    )
    missing = {k: v for k, v in arguments.items() if k != spec.schemas()[name]["required"][0]}
    key = next(iter(arguments))
    broken = {
        "missing required": (name, json.dumps(missing)),
        "wrong type": (name, json.dumps({**arguments, key: [arguments[key]]})),
        "not JSON": (name, json.dumps(arguments)[:-1]),
        "undeclared": ("no_such_tool", json.dumps(arguments)),
    }
    for why, call in broken.items():
        assert sa.call_problems(spec, _final(call)), why
    good = (name, json.dumps(arguments))
    assert sa.call_problems(spec, _final(good, errors=("tool-call section not closed",)))
    renumbered = "duplicate tool call id functions.x:0 renumbered to :1"
    assert sa.call_problems(spec, _final(good, errors=(renumbered,))) == []
    named = replace(spec, choice="named", named=name, parallel=True)
    assert sa.choice_problems(named, _final(good)) == []
    assert sa.choice_problems(named, _final(good, good))
    assert sa.choice_problems(replace(named, named="other"), _final(good))
    required = replace(spec, choice="required", named=None, parallel=True)
    assert sa.choice_problems(required, _final(good, good)) == []
    assert sa.choice_problems(required, _final())
    assert sa.choice_problems(replace(required, parallel=False), _final(good, good))


def test_guided_schema_accuracy_is_100_percent(measured: Measured, record_property) -> None:
    on = measured.on
    record_property("guided_schema_accuracy", on.accuracy)
    record_property("guided_tool_calls_responses", len(on.counted))
    failures = on.failures()  # RPC errors, invalid calls, tool_choice / parallel violations
    assert not failures, f"{len(failures)} failing responses:\n" + "\n".join(failures)
    assert len(on.outcomes) == len(measured.plan) >= MIN_CASES
    assert len(on.counted) >= MIN_TOOL_CALLS_SHARE * len(on.outcomes), on.summary()
    assert on.accuracy == 1.0
    thin = {
        combo: calls
        for combo, (_, calls, _) in on.per_combo().items()
        if calls < MIN_TOOL_CALLS_PER_COMBO
    }
    assert not thin, f"too few TOOL_CALLS responses in {thin}\n{on.summary()}"


def test_guided_parallel_calls_happen_where_allowed(measured: Measured) -> None:
    """Makes the parallel_tool_calls=false check (at most one call) meaningful: where parallel
    calls are allowed, the same biases do produce several calls in one turn."""
    counts = Counter(
        (o.spec.parallel, len(o.final.message.tool_calls)) for o in measured.on.counted
    )
    assert sum(n for (parallel, calls), n in counts.items() if parallel and calls > 1) >= 5, counts
    assert all(calls == 1 for parallel, calls in counts if not parallel), counts


def test_guided_required_and_named_never_end_without_a_call(measured: Measured) -> None:
    """The grammar allows the end of the turn only after the tool-call section: a required or
    named turn either finishes with its calls or runs out of max_tokens inside them."""
    finishes = Counter(
        (o.spec.choice, o.finish) for o in measured.on.outcomes if o.spec.choice != "auto"
    )
    assert {finish for _, finish in finishes} <= {"TOOL_CALLS", "LENGTH"}, finishes
    for o in measured.on.outcomes:
        if o.finish == "LENGTH":
            assert o.final.usage.completion_tokens == sa.MAX_TOKENS


def test_unguided_accuracy_is_far_below(measured: Measured, record_property) -> None:
    """The same requests without the grammar: the number above is the grammar's doing."""
    off = measured.off
    record_property("unguided_schema_accuracy", off.accuracy)
    record_property("unguided_attempted_accuracy", off.attempted_accuracy)
    assert all(o.final is not None for o in off.outcomes), off.failures()
    assert len(off.attempted) >= MIN_UNGUIDED_ATTEMPTS, off.summary()
    assert off.attempted_accuracy <= MAX_UNGUIDED_ACCURACY, off.summary()
    if len(off.counted) >= 20:  # K2VV's definition, when enough responses finish TOOL_CALLS
        assert off.accuracy <= MAX_UNGUIDED_ACCURACY, off.summary()


def test_server_counters_and_no_leaked_pages(measured: Measured) -> None:
    before = measured.before.guided_decoding
    between = measured.between.guided_decoding
    after = measured.after.guided_decoding
    assert before.enabled and before.constrained_requests == 0
    # Every guided request ran with a grammar (a thinking-budget phase is a second engine
    # request, so the count can exceed the requests sent); the unguided ones never did.
    assert between.constrained_requests >= len(measured.on.outcomes)
    assert after.constrained_requests == between.constrained_requests
    assert after.rejected_tokens == 0  # the sampler never picked a token its grammar refused
    assert after.lenient_fallbacks == 0  # the corpus compiles strictly
    assert after.masks > 0
    for status in (measured.between, measured.after):
        assert status.running == status.waiting == 0
        assert status.kv_pages_used == measured.before.kv_pages_used == 0
