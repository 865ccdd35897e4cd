"""Guided decoding's cost at Kimi K2.6's real vocabulary layout (163,840 ids), and its price end to
end on the engine, each against a baseline measured in the same run.

    python bench/guided.py [--json] [--quick] [--threads 1] [--parts masks,compile,e2e]

The demo tokenizer has only 2,048 ids, so masks and compiles use a synthetic Kimi-layout
tokenizer: 163,584 byte-level tokens (the 256 single bytes, whitespace runs, numbers, JSON
fragments, 7,000 CJK characters, then words / sub-words / punctuation runs harvested from
CPython's stdlib sources, most frequent first) + Kimi's 256 specials at their real ids
(163,584..163,839; names and flags from the demo tokenizer's config). Built once (~10 s) and
cached under ``--cache-dir``. Tools and golden calls come from ``tests/guided_corpus.py``.

**masks**: per decode step, ``MaskFiller.start(rows).result()`` (the engine's path: worker-thread
fill, stop-id fixups, tensor copy; no forward to hide behind), ``backend.fill_masks`` alone on
twin guides at the same positions (llguidance keeps the last mask of a state, so re-filling the
same matchers would time a cache hit), and ``apply_masks`` (in place, the native op) and the same
with the PyTorch reference op on ``[B, 163840]`` float32 logits: each gets a fresh copy of the
same random logits every step (made untimed), so it masks realistic, unmasked data as the
sampler's own ``logits[rows]`` copy is. One guide per row, rows 13 tokens apart along a valid
output (greedy longest-match tokens), all advanced one token per step. Regions: *text* (auto tool
choice after ``</think>``: free text), *arguments* (a 4-tool corpus request cycling its golden
calls in one tool-call section), *arguments-64* (64 tools, the golden calls of all 60 corpus
tools). One untimed pass first: llguidance builds lexer states lazily.

**compile**: per request with cold caches (a nonce in every ``parameters.description``):
``GrammarBuilder(backend).build`` (writes and compiles the grammar) + a fresh matcher's first
mask; 4 and 64 tools, auto tool choice. ``warm`` = the same request again (grammar cache hit).

**e2e**: ``--requests`` requests at once (random prompts, exactly ``--max-tokens`` output tokens,
greedy), unguided then guided, same prompts and ``SamplingParams``: ``min_tokens = max_tokens``
(``ignore_eos`` is refused with a grammar) and a steering ``logit_bias`` (+100 on 512 plain words,
-100 on whitespace-only and two-quote tokens), so that with ``tool_choice="required"`` and one
tool ``{"content": string}`` every guided row passes the forced call header and stays inside the
JSON string (the shares are reported). ``--pairs`` alternating pairs, median ratio, the engine's
``StepTimings``, the sampler's ``apply_masks`` time and minor page faults, per step. Engines:
``demo`` (``load_engine()``, 2,048 ids) and ``demo-kimi-vocab`` (the demo's widths with the
163,840-id vocabulary, random weights, built once under ``--cache-dir``). Goal: guided <= 5%
slower than unguided.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import copy
import json
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kimi_grpc.engine.sampler as sampler_module
import kimi_grpc.guided.masks as masks_module
from kimi_grpc.engine.llm import load_engine
from kimi_grpc.engine.llm_engine import LLMEngine, StepTimings
from kimi_grpc.guided import Constraint, Guide, GuidedStats, MaskFiller, StepMasks, apply_masks
from kimi_grpc.guided.constraint import build_constraint
from kimi_grpc.guided.llguidance_backend import LLGuidanceBackend
from kimi_grpc.guided.tool_grammar import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    SECTION_BEGIN,
    GrammarBuilder,
    tool_parameters,
)
from kimi_grpc.ops import reference
from kimi_grpc.sampling_params import SamplingParams
from kimi_grpc.tokenizer import (
    CONFIG_FILE,
    NUM_RESERVED_SPECIAL_TOKENS,
    VOCAB_FILE,
    KimiTokenizer,
    demo_tokenizer_dir,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.guided_corpus import TOOLS, corpus

NUM_BASE = 163_584  # Kimi K2.x BPE tokens
VOCAB = NUM_BASE + NUM_RESERVED_SPECIAL_TOKENS  # 163,840
VOCAB_VERSION = 1  # bump when the recipe changes (cache key)
DEMO_BASE = 1_792  # the demo tokenizer's BPE tokens: its special ids are offsets from here
MAX_TOKEN_BYTES = 32  # longest token the greedy tokenization looks for
LONG_TOOL = {
    "type": "function",
    "function": {
        "name": "notes.write",
        "description": "Write a note.",
        "parameters": {
            "type": "object",
            "properties": {"content": {"type": "string"}},
            "required": ["content"],
        },
    },
}
# GPT-2-like pre-tokenization of the harvested sources.
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# fmt: off
_JSON_FRAGMENTS = [
    '{"', '"}', '":', '": "', '", "', '",', '": {', '": [', '": [{"', '"},', '"}]', '"]', '["',
    '", ', "},", "}}", "}]", "]}", "],", ': "', ', "', ' "', '":"', '","', "{}", "[]", "\\n",
    '\\"', "\\\\", "\\t", "\\u", "true", " true", "false", " false", "null", " null", ": true",
    ": false", ": null",
]
# fmt: on
_PUNCTUATION = "{}[]()\"':,.;!?-_=+*/\\<>|&%$#@~`^"
_OPEN_STRING = re.compile(rb'\{\s*"[^"]*"\s*:\s*"')  # the arguments so far are inside a value
COLUMNS = ("fill", "native_fill", "apply_masks", "apply_reference")  # the mask table's


# ---- the Kimi-layout tokenizer ------------------------------------------------------------------


def build_ranks() -> dict[bytes, int]:
    """163,584 unique byte strings, ranks 0..255 the single bytes, deterministic for a given
    CPython stdlib."""
    fixed: list[str] = []
    fixed += [" " * n for n in range(2, 65)] + ["\t" * n for n in range(2, 17)]
    fixed += ["\n" * n for n in range(2, 9)] + ["\r\n", " \n", "\r\n\r\n"]
    fixed += ["\n" + " " * n for n in range(1, 65)] + ["\n\n" + " " * n for n in range(1, 33)]
    fixed += ["\n" + "\t" * n for n in range(1, 9)]
    fixed += [str(i) for i in range(10, 1000)] + [f" {i}" for i in range(1000)]
    fixed += _JSON_FRAGMENTS
    fixed += [a + b for a in _PUNCTUATION for b in _PUNCTUATION]
    fixed += [" " + a for a in _PUNCTUATION] + [" " + a + b for a in "{[(\"'" for b in "\"'{[("]
    fixed += [chr(c) for c in range(0x4E00, 0x4E00 + 7_000)]  # CJK, 3-byte UTF-8
    fixed += list("，。：；？！“”（）、《》") + [chr(c) for c in range(0xC0, 0x180)]  # 2/3-byte
    fixed += [" " + chr(c) for c in range(0xC0, 0x180)]

    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" not in path.parts:
            with contextlib.suppress(UnicodeDecodeError, OSError):
                counts.update(_PIECE.findall(path.read_text("utf-8")))
    words: collections.Counter[str] = collections.Counter()
    for piece, n in counts.items():
        core = piece.lstrip(" ")
        if core.isascii() and core.isalpha():
            words[core] += n
            for k in range(2, len(core)):  # sub-words: prefixes and suffixes
                words[core[:k]] += n
                words[core[k:]] += n
    candidates: collections.Counter[str] = collections.Counter()
    for word, n in words.items():
        candidates[word] += n
        candidates[" " + word] += n
    for piece, n in counts.items():
        if not piece.strip(" ").isalpha():
            candidates[piece] += n
    ordered = sorted(candidates.items(), key=lambda item: (-item[1], item[0]))

    ranks = {bytes([b]): b for b in range(256)}
    for text in [*fixed, *(text for text, _ in ordered)]:
        data = text.encode("utf-8")
        if len(data) > 1 and data not in ranks:
            ranks[data] = len(ranks)
            if len(ranks) == NUM_BASE:
                return ranks
    raise RuntimeError(f"only {len(ranks)} distinct tokens harvested, need {NUM_BASE}")


def kimi_layout_tokenizer_dir(cache_dir: Path) -> tuple[Path, float]:
    """A tokenizer directory with the synthetic ranks and the demo's specials at Kimi's ids;
    built once. Returns (dir, build seconds)."""
    out = cache_dir / f"kimi-layout-tokenizer-v{VOCAB_VERSION}-py{sys.version_info[1]}"
    if (out / CONFIG_FILE).is_file():
        return out, 0.0
    start = time.perf_counter()
    ranks = build_ranks()
    cfg = json.loads((demo_tokenizer_dir() / CONFIG_FILE).read_text())
    cfg["added_tokens_decoder"] = {
        str(NUM_BASE + int(key) - DEMO_BASE): entry
        for key, entry in cfg["added_tokens_decoder"].items()
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=cache_dir))
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (staging / VOCAB_FILE).write_text("\n".join(lines) + "\n")
    (staging / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    staging.rename(out)
    return out, time.perf_counter() - start


# ---- valid outputs ------------------------------------------------------------------------------


def encode(tok: KimiTokenizer, text: str) -> list[int]:
    """Greedy longest-match tokenization (any tokenization of a valid output is valid)."""
    ranks = tok.encoding._mergeable_ranks
    data, out, i = text.encode("utf-8"), [], 0
    while i < len(data):
        longest = range(min(MAX_TOKEN_BYTES, len(data) - i), 0, -1)
        n = next(n for n in longest if data[i : i + n] in ranks)
        out.append(ranks[data[i : i + n]])
        i += n
    return out


def grammar_order(value: Any, schema: Any, defs: dict[str, Any]) -> Any:
    """``value`` with object keys in the order the grammar emits them (GrammarBuilder orders
    ``properties`` required first, then by name; the corpus examples follow schema order)."""
    if not isinstance(schema, dict):
        schema = {}
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if isinstance(value, dict):
        if "properties" not in schema:  # an anyOf: the first object member
            members = [
                defs.get(m.get("$ref", "").rsplit("/", 1)[-1], m) for m in schema.get("anyOf", [])
            ]
            schema = next((m for m in members if "properties" in m), schema)
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: grammar_order(value[k], props.get(k, extra), defs) for k in keys}
    if isinstance(value, list):
        return [grammar_order(v, schema.get("items"), defs) for v in value]
    return value


def prose_stream(tok: KimiTokenizer) -> list[int]:
    """English free text: the corpus' requests and tool descriptions."""
    parts = [m["content"] for c in corpus()[:60] for m in c.messages if m["role"] == "user"]
    parts += [
        f"- `{t['function']['name']}`: {t['function']['description']}" for t in TOOLS.values()
    ]
    return encode(tok, "Here is what I found.\n\n" + "\n".join(parts))


def call_stream(
    tok: KimiTokenizer, tools: list[dict], calls: list[tuple[str, dict]], min_tokens: int
) -> list[int]:
    """``<section_begin>`` then ``calls`` (cycled) until ``min_tokens`` tokens; never closed."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    ids = [tok.token_id(SECTION_BEGIN)]
    index = 0
    while len(ids) < min_tokens:
        name, args = calls[index % len(calls)]
        schema = tool_parameters(by_name[name])
        text = json.dumps(grammar_order(args, schema, schema.get("$defs", {})), ensure_ascii=False)
        ids += [tok.token_id(CALL_BEGIN), *encode(tok, f"functions.{name}:{index % 10_000}")]
        ids += [tok.token_id(ARGUMENT_BEGIN), *encode(tok, text), tok.token_id(CALL_END)]
        index += 1
    return ids


def backend_eos(tokenizer: KimiTokenizer) -> list[int]:
    return sorted(t for t in (tokenizer.eos_id, tokenizer.im_end_id) if t is not None)


def tools_64() -> list[dict]:
    """The 60 corpus tools and 4 renamed copies."""
    tools = [copy.deepcopy(t) for _, t in sorted(TOOLS.items())]
    for t in copy.deepcopy(tools[:4]):
        t["function"]["name"] += "_v2"
        tools.append(t)
    return tools


# ---- masks --------------------------------------------------------------------------------------


def apply_reference(logits: torch.Tensor, masks: StepMasks) -> torch.Tensor:
    """``apply_masks`` with the PyTorch reference op (what runs without the native extension)."""
    saved = masks_module.ops.apply_token_bitmask_
    masks_module.ops.apply_token_bitmask_ = reference.apply_token_bitmask_
    try:
        return apply_masks(logits, masks)
    finally:
        masks_module.ops.apply_token_bitmask_ = saved


def _stats(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "mean_us": statistics.fmean(us),
        "p50_us": us[len(us) // 2],
        "p99_us": us[min(len(us) - 1, round(0.99 * (len(us) - 1)))],
        "max_us": us[-1],
    }


def bench_region(
    backend: LLGuidanceBackend,
    constraint: Constraint,
    ids: list[int],
    batch: int,
    steps: int,
    stride: int,
    stops: frozenset[int],
) -> dict[str, Any]:
    assert len(ids) >= stride * (batch - 1) + steps + 1, (len(ids), batch, steps)
    filler = MaskFiller(backend, GuidedStats())
    guides, twins, lengths = [], [], [row * stride for row in range(batch)]
    for n in lengths:
        for group in (guides, twins):
            group.append(Guide(constraint))
            group[-1].sync(ids[:n], stops)
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch))
    buffer = np.empty((batch, backend.words), dtype=np.int32)
    times: dict[str, list[float]] = {k: [] for k in COLUMNS}
    try:
        for step in range(steps):
            rows = [(i, g, stops) for i, g in enumerate(guides)]
            native_rows = [(g.matcher, i) for i, g in enumerate(twins)]
            # Alternate which goes first (they share lazily built lexer states).
            for name in ("fill", "native_fill")[:: 1 if step % 2 else -1]:
                t0 = time.perf_counter()
                if name == "fill":
                    masks = filler.start(rows).result()
                else:
                    backend.fill_masks(native_rows, buffer)
                times[name].append(time.perf_counter() - t0)
            assert not masks.empty, "a row's grammar allows nothing"
            outs = []
            for name, apply in (("apply_masks", apply_masks), ("apply_reference", apply_reference)):
                x = logits.clone()  # in place: a fresh, unmasked copy each time (untimed)
                t0 = time.perf_counter()
                outs.append(apply(x, masks))
                times[name].append(time.perf_counter() - t0)
            if step == 0:
                assert torch.equal(*outs)
            for row in range(batch):
                lengths[row] += 1
                guides[row].sync(ids[: lengths[row]], stops)
                twins[row].sync(ids[: lengths[row]], stops)
    finally:
        filler.shutdown()
    return {"batch": batch, "steps": steps, **{k: _stats(v) for k, v in times.items()}}


def bench_masks(backend: LLGuidanceBackend, tok: KimiTokenizer, quick: bool) -> list[dict]:
    stops = frozenset(backend_eos(tok))
    steps = 64 if quick else 256
    batches = (1, 8) if quick else (1, 8, 32)
    stride = 13
    need = stride * (max(batches) - 1) + steps + 1
    four = next(case for case in corpus() if len(case.tools) == 4)
    all_calls = sorted({(n, json.dumps(a)) for c in corpus() for n, a in c.example_calls})
    sixty_four = tools_64()
    regions = {
        "text": (four.tools, prose_stream(tok)),
        "arguments": (four.tools, call_stream(tok, four.tools, four.example_calls, need)),
        "arguments-64": (
            sixty_four,
            call_stream(tok, sixty_four, [(n, json.loads(a)) for n, a in all_calls], need),
        ),
    }
    results = []
    for region, (tools, ids) in regions.items():
        assert len(ids) >= need, (region, len(ids))
        constraint = build_constraint(
            backend, tok, GuidedStats(), tools=tools, tool_choice="auto", thinking=False
        )
        Guide(constraint).sync(ids, stops)  # raises if the stream is not a valid output
        bench_region(backend, constraint, ids, 1, steps, stride, stops)  # untimed warm-up
        for batch in batches:
            row = bench_region(backend, constraint, ids, batch, steps, stride, stops)
            results.append({"region": region, "tools": len(tools), **row})
    return results


# ---- per-request compile ------------------------------------------------------------------------


def bench_compile(backend: LLGuidanceBackend, quick: bool) -> list[dict[str, Any]]:
    four = next(case for case in corpus() if len(case.tools) == 4).tools
    buffer = np.empty((1, backend.words), dtype=np.int32)
    results = []
    for tools, reps in ((four, 8 if quick else 30), (tools_64(), 3 if quick else 10)):
        build_s, first_s, total_s = [], [], []
        for rep in range(reps + 1):  # rep 0: untimed warm-up of the code paths
            variant = copy.deepcopy(tools)
            for tool in variant:  # a distinct grammar: every cache misses
                params = tool["function"].setdefault("parameters", {"type": "object"})
                params["description"] = f"bench {time.time_ns()} {rep}"
            t0 = time.perf_counter()
            built = GrammarBuilder(backend).build(tools=variant, tool_choice="auto")
            t1 = time.perf_counter()
            backend.fill_masks([(built.compiled.matcher(), 0)], buffer)
            t2 = time.perf_counter()
            assert not built.lenient
            if rep:
                build_s.append(t1 - t0)
                first_s.append(t2 - t1)
                total_s.append(t2 - t0)
        t0 = time.perf_counter()
        GrammarBuilder(backend).build(tools=variant, tool_choice="auto")
        warm = time.perf_counter() - t0
        results.append(
            {
                "tools": len(tools),
                "requests": reps,
                "grammar_chars": len(built.text),
                "build_ms": 1e3 * statistics.median(build_s),
                "first_mask_ms": 1e3 * statistics.median(first_s),
                "total_ms": 1e3 * statistics.median(total_s),
                "total_max_ms": 1e3 * max(total_s),
                "warm_ms": 1e3 * warm,
            }
        )
    return results


# ---- end to end ---------------------------------------------------------------------------------


def _timings(engine: LLMEngine) -> dict[str, float]:
    return {k: getattr(engine.timings, k) for k in StepTimings.__dataclass_fields__ if k != "steps"}


def run_queue(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, guided: bool
) -> dict[str, Any]:
    constraint = None
    if guided:
        constraint = build_constraint(
            engine.grammar_backend,
            engine.tokenizer,
            engine.guided_stats,
            tools=[LONG_TOOL],
            tool_choice="required",
            thinking=False,
        )
    steps0, phases0, fill0 = (
        engine.timings.steps,
        _timings(engine),
        engine.guided_stats.mask_seconds,
    )
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    applied = [0.0]  # seconds in the sampler's apply_masks

    def timed_apply(logits: torch.Tensor, masks: StepMasks) -> torch.Tensor:
        t = time.perf_counter()
        out = apply_masks(logits, masks)
        applied[0] += time.perf_counter() - t
        return out

    sampler_module.apply_masks = timed_apply
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params, constraint=constraint)
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.error or delta.finish_reason == "abort":
                    raise RuntimeError(f"request {delta.request_id} failed: {delta.error}")
                outputs[delta.request_id] += delta.token_ids
    finally:
        sampler_module.apply_masks = apply_masks
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    tokens = sum(len(v) for v in outputs.values())
    assert tokens == len(prompts) * params.max_tokens, tokens
    steps = engine.timings.steps - steps0
    result = {
        "tok_s": tokens / seconds,
        "steps": steps,
        "ms_per_step": {k: 1e3 * (v - phases0[k]) / steps for k, v in _timings(engine).items()},
        "fill_ms_per_step": 1e3 * (engine.guided_stats.mask_seconds - fill0) / steps,
        "apply_ms_per_step": 1e3 * applied[0] / steps,
        "page_faults_per_step": faults / steps,
    }
    if guided:  # how many output tokens were inside the arguments / inside the JSON string
        tok = engine.tokenizer
        arg_begin, call_end = tok.token_id(ARGUMENT_BEGIN), tok.token_id(CALL_END)
        inside = in_string = 0
        for ids in outputs.values():
            state, text = False, b""
            for token in ids:
                inside += state
                in_string += state and _OPEN_STRING.match(text) is not None
                text = text + tok.token_bytes(token) if state else b""
                state = True if token == arg_begin else False if token == call_end else state
        result["share_in_arguments"] = inside / tokens
        result["share_in_string"] = in_string / tokens
    return result


def steering_bias(tokenizer: KimiTokenizer, words: int = 512) -> dict[int, float]:
    """+100 on the ``words`` lowest-ranked plain ASCII words (optional leading space): text a
    JSON string accepts; -100 on whitespace-only tokens and on tokens with two quotes."""
    ranks = tokenizer.encoding._mergeable_ranks
    plain = sorted(r for b, r in ranks.items() if re.fullmatch(rb" ?[A-Za-z]{2,}", b))
    bias = dict.fromkeys(plain[:words], 100.0)
    bias.update((r, -100.0) for b, r in ranks.items() if b.isspace() or b.count(b'"') >= 2)
    return bias


def bench_e2e(name: str, engine: LLMEngine, args: argparse.Namespace, pairs: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    base = engine.tokenizer.num_base_tokens
    prompts = [[rng.randrange(base) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = SamplingParams(
        temperature=0,
        max_tokens=args.max_tokens,
        min_tokens=args.max_tokens,
        logit_bias=steering_bias(engine.tokenizer),
    )
    warm = SamplingParams(**{**params.__dict__, "max_tokens": 8, "min_tokens": 8})
    run_queue(engine, prompts[:4], warm, guided=False)
    run_queue(engine, prompts[:4], warm, guided=True)
    runs = []
    for _ in range(pairs):
        off = run_queue(engine, prompts, params, guided=False)
        on = run_queue(engine, prompts, params, guided=True)
        runs.append({"unguided": off, "guided": on, "ratio": on["tok_s"] / off["tok_s"]})
    median = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    on, off = median["guided"], median["unguided"]
    return {
        "engine": name,
        "vocab": engine.model.config.vocab_size,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "ratios": [r["ratio"] for r in runs],
        "median_ratio": median["ratio"],
        "unguided_tok_s": off["tok_s"],
        "guided_tok_s": on["tok_s"],
        "unguided_ms_per_step": off["ms_per_step"],
        "guided_ms_per_step": on["ms_per_step"],
        "fill_ms_per_step": on["fill_ms_per_step"],
        "apply_ms_per_step": on["apply_ms_per_step"],
        "mask_wait_share": on["ms_per_step"]["mask_wait"] / sum(on["ms_per_step"].values()),
        "share_in_arguments": on["share_in_arguments"],
        "share_in_string": on["share_in_string"],
        "page_faults_per_step": [off["page_faults_per_step"], on["page_faults_per_step"]],
    }


def kimi_vocab_engine(cache_dir: Path, tokenizer_dir: Path) -> LLMEngine:
    """The demo model's widths with the 163,840-id Kimi-layout vocabulary (random weights)."""
    from kimi_grpc.checkpoint_maker import preset_config, random_tensors, write_checkpoint

    path = cache_dir / f"demo-kimi-vocab-v{VOCAB_VERSION}"
    if not (path / "model.safetensors.index.json").exists():
        tokenizer = KimiTokenizer.from_dir(tokenizer_dir)
        config = preset_config("demo", tokenizer)
        write_checkpoint(
            path, config, random_tensors(config, 0), tokenizer_dir=tokenizer_dir, chat_template=None
        )
    return load_engine(str(path), kv_cache_memory=256 * 1024**2)


# ---- main ---------------------------------------------------------------------------------------


def _cell(s: dict[str, float]) -> str:
    return "{mean_us:6.0f} {p50_us:6.0f} {p99_us:6.0f}".format(**s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="fewer steps, B in {1, 8}, 1 pair")
    ap.add_argument("--parts", default="masks,compile,e2e")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "kimi-bench"))
    ap.add_argument("--engines", default="demo,demo-kimi-vocab")
    ap.add_argument("--pairs", type=int, default=3, help="alternating unguided/guided runs")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    git = ["git", "rev-parse", "--short", "HEAD"]
    result: dict[str, Any] = {
        "commit": subprocess.run(git, capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    log = (lambda *a: None) if args.json else print

    tok_dir, vocab_s = kimi_layout_tokenizer_dir(cache_dir)
    if parts & {"masks", "compile"}:
        t0 = time.perf_counter()
        tok = KimiTokenizer.from_dir(tok_dir)
        t1 = time.perf_counter()
        backend = LLGuidanceBackend(tok, eos_token_ids=backend_eos(tok), vocab_size=VOCAB)
        t2 = time.perf_counter()
        result["tokenizer"] = {"vocab_build_s": vocab_s, "load_s": t1 - t0, "ll_build_s": t2 - t1}
        built = f"built in {vocab_s:.1f} s" if vocab_s else "cached"
        log(
            f"Kimi-layout tokenizer: {tok.vocab_size} ids ({built}), KimiTokenizer load "
            f"{t1 - t0:.2f} s, LLTokenizer build {t2 - t1:.2f} s"
        )
    if "masks" in parts:
        result["masks"] = bench_masks(backend, tok, args.quick)
        log("\nMasks per decode step, µs (mean / p50 / p99):")
        log(f"  {'region':<13} {'B':>3}  " + "  ".join(f"{k:>20}" for k in COLUMNS))
        for r in result["masks"]:
            log(f"  {r['region']:<13} {r['batch']:>3}  " + "  ".join(_cell(r[k]) for k in COLUMNS))
    if "compile" in parts:
        result["compile"] = bench_compile(backend, args.quick)
        log("\nPer-request compile (cold caches), median ms:")
        for r in result["compile"]:
            log(
                f"  {r['tools']:>2} tools: build {r['build_ms']:.2f} + first mask "
                f"{r['first_mask_ms']:.2f} = {r['total_ms']:.2f} (max {r['total_max_ms']:.2f}; "
                f"warm {r['warm_ms']:.3f}; {r['grammar_chars']} chars)"
            )
    if "e2e" in parts:
        result["e2e"] = []
        for name in args.engines.split(","):
            if name == "demo":
                engine = load_engine(kv_cache_memory=256 * 1024**2)
            elif name == "demo-kimi-vocab":
                engine = kimi_vocab_engine(cache_dir, tok_dir)
            else:
                raise SystemExit(f"unknown engine {name!r}")
            try:
                r = bench_e2e(name, engine, args, 1 if args.quick else args.pairs)
            finally:
                engine.shutdown()
            result["e2e"].append(r)
            log(
                f"\n{name} (vocab {r['vocab']}): {r['requests']} requests x {r['max_tokens']} "
                f"tokens; unguided {r['unguided_tok_s']:.0f} tok/s, guided {r['guided_tok_s']:.0f}"
                f" tok/s; guided/unguided {', '.join(f'{x:.3f}' for x in r['ratios'])} -> median "
                f"{r['median_ratio']:.3f} (goal >= 0.95)"
            )
            for mode in ("unguided", "guided"):
                ms = r[f"{mode}_ms_per_step"]
                log(f"  {mode:>8} ms/step: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
            log(
                f"  mask fill {r['fill_ms_per_step']:.3f} ms/step (worker thread), apply_masks "
                f"{r['apply_ms_per_step']:.3f} ms/step (in the sample phase), mask_wait "
                f"{100 * r['mask_wait_share']:.2f}% of step time; output tokens inside the "
                f"arguments {100 * r['share_in_arguments']:.1f}%, inside the string "
                f"{100 * r['share_in_string']:.1f}%; minor page faults per step (unguided, "
                f"guided) {r['page_faults_per_step'][0]:.0f}, {r['page_faults_per_step'][1]:.0f}"
            )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
