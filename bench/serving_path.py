"""The host path around the forward (issue 18): step time ÷ forward time with a stub forward.

    python bench/serving_path.py [--waits-ms 2 10] [--batches 1 32 256] [--steps 50] [--json]

The real engine (scheduler, block manager, sampler, detokeniser, stop checks) on the demo
checkpoint, with the model's forward replaced by ``engine.stub_forward`` — a wait with the GIL
released, as a GPU forward is for the host, then logits. For each wait and batch size B, B
requests with 16-token prompts are admitted and prefilled; then ``--steps`` decode steps (every
sequence decoding, greedy, ignore_eos) are timed. Reported per step: wall time, the stub's wait,
their ratio (goal ≤ 1.05: the host's work hidden behind the forward), and the engine's own
phase split (schedule, prepare, sample: host work that runs between forwards today).
Baseline: the stub's wait itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_grpc.engine.llm import load_engine  # noqa: E402
from kimi_grpc.engine.llm_engine import StepTimings  # noqa: E402
from kimi_grpc.engine.stub_forward import use_stub_forward  # noqa: E402
from kimi_grpc.sampling_params import SamplingParams  # noqa: E402

PROMPT = 16


def run(wait_s: float, batch: int, steps: int) -> dict:
    engine = load_engine(
        dtype="float32",
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch * PROMPT),
        kv_cache_memory=64 * 1024**2,
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
        "step_ms": 1e3 * wall,
        "step_over_forward": wall / wait_s,
        "schedule_ms": 1e3 * t.schedule / t.steps,
        "prepare_ms": 1e3 * t.prepare / t.steps,
        "sample_ms": 1e3 * t.sample / t.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--waits-ms", type=float, nargs="+", default=[2.0, 10.0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [run(w / 1e3, b, args.steps) for w in args.waits_ms for b in args.batches]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"stub forward, demo engine, {args.steps} decode steps; goal step/forward <= 1.05")
    print(
        f"{'wait ms':>8}{'batch':>7}{'step ms':>9}{'step/fwd':>10}{'schedule':>10}"
        f"{'prepare':>9}{'sample':>8}"
    )
    for r in rows:
        print(
            f"{r['wait_ms']:>8.1f}{r['batch']:>7}{r['step_ms']:>9.2f}{r['step_over_forward']:>10.3f}"
            f"{r['schedule_ms']:>10.3f}{r['prepare_ms']:>9.3f}{r['sample_ms']:>8.3f}"
        )


if __name__ == "__main__":
    main()
