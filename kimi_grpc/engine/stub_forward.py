"""A stand-in for the model's forward, for measuring the host path (tests and benchmarks only).

``use_stub_forward(engine, seconds)`` replaces rank 0's forward with one that sleeps ``seconds``
(``time.sleep`` releases the GIL, as a GPU forward does while the host waits on the device) and
returns logits that make each sequence's next token a fixed function of its position, so greedy
streams are deterministic and look like text. Everything else — scheduler, block manager,
sampler, detokeniser, stop checks, the gRPC and HTTP servers — is the real code. One process
only: under tensor parallelism the other ranks would still run the real forward.
"""

from __future__ import annotations

import time

import torch

from kimi_grpc.engine.llm_engine import LLMEngine
from kimi_grpc.model.forward_batch import ForwardBatch

STUB_TOKENS = 1000  # next tokens are drawn from ids 100 .. 1099 (plain text in the demo vocab)


class StubForward:
    def __init__(self, vocab_size: int, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the stub forward's wait must be >= 0 s, got {seconds}")
        self.vocab_size, self.seconds = vocab_size, seconds
        self.calls = 0  # forwards run

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits ``[num_sequences, vocab]``, after waiting ``seconds``."""
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        positions = batch.positions[batch.logits_indices]
        tokens = 100 + (positions * 7919) % min(STUB_TOKENS, self.vocab_size - 100)
        logits = torch.zeros(len(batch.query_lens), self.vocab_size)
        logits[torch.arange(len(tokens)), tokens] = 10.0
        return logits


def use_stub_forward(engine: LLMEngine, seconds: float) -> StubForward:
    """Makes ``engine`` run :class:`StubForward` instead of the model (one process only)."""
    if engine.leader is not None:
        raise ValueError("the stub forward replaces one process's model: tensor_parallel_size=1")
    stub = StubForward(engine.model.config.vocab_size, seconds)
    engine.runner.forward = stub
    return stub
