"""A stand-in for the model's forward, for measuring the host path (tests and benchmarks only).

``use_stub_forward(engine, seconds)`` replaces rank 0's forward with one that takes ``seconds``
(``time.sleep`` releases the GIL, as a GPU forward does while the host waits on the device) and
returns logits that make each sequence's next token a fixed function of its position, so greedy
streams are deterministic and look like text. Everything else — scheduler, block manager,
sampler, detokeniser, stop checks, the gRPC and HTTP servers — is the real code. One process
only: under tensor parallelism the other ranks would still run the real forward.

The logits cover only the first ``STUB_LOGITS`` ids (every token the stub picks is below): over
K2.6's 163,840 ids, building and arg-maxing ``[B, V]`` float32 logits is device work on a GPU
(microseconds) but milliseconds of this CPU's memory bandwidth at B = 256, which would measure
the CPU rather than the host path. So grammar-constrained requests (full-vocabulary masks) are
not supported with the stub.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time

import torch

from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.model.forward_batch import ForwardBatch

STUB_TOKENS = 1000  # next tokens are drawn from ids 100 .. 1099 (plain text in the demo vocab)
STUB_LOGITS = 2048  # logits width
PR_SET_TIMERSLACK = 29  # linux/prctl.h


class StubForward:
    def __init__(self, vocab_size: int, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the stub forward's wait must be >= 0 s, got {seconds}")
        self.vocab_size, self.seconds = vocab_size, seconds
        self.calls = 0  # forwards run

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits ``[num_sequences, min(vocab, STUB_LOGITS)]``, ``seconds`` after the
        call (the logits' own cost included)."""
        start = time.perf_counter()
        self.calls += 1
        positions = batch.positions[batch.logits_indices]
        tokens = 100 + (positions * 7919) % min(STUB_TOKENS, self.vocab_size - 100)
        logits = torch.zeros(len(batch.query_lens), min(self.vocab_size, STUB_LOGITS))
        logits[torch.arange(len(tokens)), tokens] = 10.0
        left = self.seconds - (time.perf_counter() - start)
        if left > 0:
            _precise_timers()
            time.sleep(left)
        return logits


_timer_slack = threading.local()


def _precise_timers() -> None:
    """Linux wakes a sleeping thread up to its timer slack (50 µs) late; the stub's thread asks
    for 1 µs so a 2 ms wait is 2 ms (a no-op where prctl is missing)."""
    if getattr(_timer_slack, "set", False):
        return
    _timer_slack.set = True
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def use_stub_forward(engine: LLMEngine, seconds: float) -> StubForward:
    """Makes ``engine`` run :class:`StubForward` instead of the model (one process only)."""
    if engine.leader is not None:
        raise ValueError("the stub forward replaces one process's model: tensor_parallel_size=1")
    stub = StubForward(engine.model.config.vocab_size, seconds)
    engine.runner.forward = stub
    return stub
