"""Turns a scheduled step into one model forward over the paged latent cache."""

from __future__ import annotations

import torch

from kimi_grpc.engine.media_encoder import MediaEncoder
from kimi_grpc.engine.sequence import Sequence
from kimi_grpc.model import ForwardBatch
from kimi_grpc.parallel.executor import RankExecutor
from kimi_grpc.parallel.leader import Leader


class ModelRunner:
    def __init__(
        self,
        executor: RankExecutor,
        leader: Leader | None = None,
        media: MediaEncoder | None = None,
    ) -> None:
        """``executor``: rank 0's model and cache; ``media``: the vision encoder (None for a
        text-only checkpoint)."""
        self.executor, self.leader, self.media = executor, leader, media

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> ForwardBatch:
        """The flat batch computing ``n`` new tokens for each ``(sequence, n)``, with the vision
        embeddings of any image / video positions among them (encoded here when not cached).
        A sequence whose last new token is still being sampled by the step in flight
        (overlapped scheduling) gets id 0 there: ``ForwardBatch.fill_last_tokens`` sets it
        before the forward."""
        new_tokens, context_lens, tables = [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            known = seq.num_tokens
            if start + n <= known:
                new_tokens.append(seq.token_slice(start, start + n))
            else:
                new_tokens.append(seq.token_slice(start, known) + [0] * (start + n - known))
            context_lens.append(start + n)
            tables.append(list(seq.table.pages))  # a snapshot: the table changes under overlap
        step_media = None
        if self.media is not None and any(seq.media for seq, _ in scheduled):
            ranges = [
                (seq.media, seq.num_computed_tokens, n, seq.media_hold) for seq, n in scheduled
            ]
            step_media = self.media.step_embeddings(ranges)
        batch = ForwardBatch.build(  # on the host: the device thread moves it (ForwardBatch.to)
            new_tokens,
            context_lens,
            tables,
            self.executor.cache.page_size,
            torch.device("cpu"),
            media_rows=step_media.rows if step_media else (),
            dcp_rank=self.executor.model.ctx.dcp_rank,
            dcp_size=self.executor.model.ctx.dcp_size,
        )
        if step_media is not None:
            batch.media_embeds = step_media.embeds
        return batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits ``[num_sequences, vocab]`` at each sequence's last computed token.
        Under tensor parallelism rank 0 first broadcasts the batch; every rank runs the forward."""
        batch = batch.to(self.executor.model.device)
        if self.leader is None:
            return self.executor.forward(batch)
        with self.leader.step(batch):
            return self.executor.forward(batch)
