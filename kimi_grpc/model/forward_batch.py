"""What one forward step computes: a flat batch of new tokens from several sequences.

Every sequence contributes ``query_len`` new tokens appended after ``context_len - query_len``
tokens already in its paged latent cache. Sequences with one new token take the absorbed-MLA
decode path (``ops.mla_decode`` over the block table); longer ones take the prefill path, which
also reads any cached prefix through the block table (prefix caching, chunked prefill).

Under decode context parallelism (``dcp_size`` N > 1) each rank stores only the tokens it owns
(model/context_parallel.py): the batch carries this rank's rows and slots, and how many of each
sequence's tokens it holds. Every rank builds its own batch from the same host inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from kimi_grpc.model.context_parallel import local_length


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64, the new tokens of all sequences, sequence after sequence
    positions: torch.Tensor  # [N] int64, absolute position of each new token
    # [K] int64, the local cache slot of each new token this rank stores (K = N without DCP:
    # page * page_size + offset; model/context_parallel.py for the DCP layout)
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [B, max_pages] int32
    context_lens: torch.Tensor  # [B] int32, tokens in the cache after this step
    query_lens: list[int]  # [B] new tokens per sequence (host)
    context_lens_host: list[int]  # [B] (host)
    decode_seqs: torch.Tensor  # [B_decode] int64 sequences with one new token
    decode_tokens: torch.Tensor  # [B_decode] int64 their token index in the flat batch
    logits_indices: torch.Tensor  # [B] int64 flat index of each sequence's last token
    # The host inputs ``build`` was given (what tensor-parallel rank 0 broadcasts to the others).
    new_token_ids: list[list[int]]  # [B][query_len]
    block_tables_host: list[list[int]]  # [B][pages]
    page_size: int  # tokens per local cache page
    # Decode context parallelism: the flat tokens this rank stores (None: all of them, no DCP);
    # the tokens of each sequence in its cache after the step; the decode sequences (index into
    # decode_seqs) with at least one of them.
    kv_rows: torch.Tensor | None = None  # [K] int64
    local_context_lens: torch.Tensor | None = None  # [B] int32
    local_context_lens_host: list[int] = ()
    local_decode_rows: torch.Tensor | None = None  # [B_decode_local] int64
    # Vision embeddings: ``media_embeds[i]`` replaces the embedding of flat token
    # ``media_rows[i]`` (an image / video position). Under tensor parallelism only rank 0 has
    # the embeddings (None on the others, which receive them from rank 0 in the forward).
    media_rows: torch.Tensor | None = None  # [M] int64, or None without media in this step
    media_rows_host: list[int] = ()
    media_embeds: torch.Tensor | None = None  # [M, hidden]
    # Host-tier moves to make before the forward (rank 0's block manager decided them): saves
    # ``(device page, host page)`` first, then loads ``(host page, device page)``.
    kv_saves: list[tuple[int, int]] = ()
    kv_loads: list[tuple[int, int]] = ()

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        context_lens: list[int],
        block_tables: list[list[int]],
        page_size: int,
        device: torch.device,
        media_rows: list[int] = (),
        kv_saves: list[tuple[int, int]] = (),
        kv_loads: list[tuple[int, int]] = (),
        dcp_rank: int = 0,
        dcp_size: int = 1,
    ) -> ForwardBatch:
        """``token_ids[b]`` are sequence b's new tokens; it holds ``context_lens[b]`` tokens after
        the step, stored in pages ``block_tables[b]`` of ``page_size × dcp_size`` tokens each
        (``page_size`` of them on this rank). ``media_rows``: the flat tokens whose embeddings
        are vision embeddings (ascending; set ``media_embeds`` on rank 0)."""
        if not 0 <= dcp_rank < dcp_size:
            raise ValueError(f"dcp_rank={dcp_rank} outside dcp_size={dcp_size}")
        span = page_size * dcp_size  # tokens per block-table page
        # Host work is O(B) list appends; the per-token arithmetic is a few tensor ops, so a
        # 256-sequence decode step costs about what a 1-sequence one does (the host path runs
        # during the previous step's forward: issue 18).
        query_lens = [len(new) for new in token_ids]
        num_seqs = len(query_lens)
        max_pages = max(len(p) for p in block_tables)
        flat_table: list[int] = []
        for b, (n, total, pages) in enumerate(
            zip(query_lens, context_lens, block_tables, strict=True)
        ):
            if n == 0 or n > total:
                raise ValueError(f"sequence {b}: {n} new tokens with context length {total}")
            if len(pages) * span < total:
                raise ValueError(f"sequence {b}: {len(pages)} pages cannot hold {total} tokens")
            flat_table += pages
            flat_table += [0] * (max_pages - len(pages))
        ids = [t for new in token_ids for t in new]
        num_tokens = len(ids)
        last = list(itertools.accumulate(query_lens, initial=-1))[1:]  # flat index of each last
        decode_seqs = [b for b, n in enumerate(query_lens) if n == 1]
        table = torch.tensor(flat_table, dtype=torch.int32).view(num_seqs, max_pages)
        lens = torch.tensor(query_lens)
        totals = torch.tensor(context_lens)
        if len(decode_seqs) == num_seqs:  # the steady state: one new token per sequence
            seq_of_token = torch.arange(num_seqs)
            positions = totals - 1
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), lens)
            first = torch.tensor(last) + 1 - lens  # flat index of each sequence's first token
            offset = torch.arange(num_tokens) - first[seq_of_token]
            positions = (totals - lens)[seq_of_token] + offset
        local_pages = table[seq_of_token, positions // span].long()
        slots = local_pages * page_size + (positions % span) // dcp_size
        kv_rows = None
        if dcp_size > 1:  # this rank stores only the positions it owns
            kv_rows = torch.nonzero(positions % dcp_size == dcp_rank).flatten()
            slots = slots[kv_rows]

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        if media_rows and not all(0 <= r < num_tokens for r in media_rows):
            raise ValueError(f"media rows outside the batch's {num_tokens} tokens")
        local_lens = [local_length(total, dcp_rank, dcp_size) for total in context_lens]
        sharded = dcp_size > 1
        return cls(
            kv_rows=kv_rows.to(device) if sharded else None,
            local_context_lens=(
                torch.tensor(local_lens, dtype=torch.int32, device=device) if sharded else None
            ),
            local_context_lens_host=local_lens,
            local_decode_rows=(
                longs([i for i, b in enumerate(decode_seqs) if local_lens[b]]) if sharded else None
            ),
            media_rows=longs(list(media_rows)) if media_rows else None,
            media_rows_host=list(media_rows),
            kv_saves=list(kv_saves),
            kv_loads=list(kv_loads),
            input_ids=longs(ids),
            positions=positions.to(device),
            slot_mapping=slots.to(device),
            block_tables=table.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_lens=query_lens,
            context_lens_host=list(context_lens),
            decode_seqs=longs(decode_seqs),
            decode_tokens=longs([last[b] for b in decode_seqs]),
            logits_indices=longs(last),
            new_token_ids=token_ids,
            block_tables_host=block_tables,
            page_size=page_size,
        )

    def to(self, device: torch.device) -> ForwardBatch:
        """This batch with every tensor on ``device`` (the engine builds batches on the host and
        the device thread moves them: a copy to a GPU from the engine thread would wait for the
        forward in flight)."""
        moved = {
            f.name: value.to(device)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor) and value.device != device
        }
        return dataclasses.replace(self, **moved) if moved else self

    def fill_last_tokens(self, seqs: list[int], token_ids: list[int]) -> None:
        """Sets the last new token of sequences ``seqs`` to ``token_ids`` (overlapped
        scheduling: the batch was built while the step sampling them was still running)."""
        ends = list(itertools.accumulate(self.query_lens))
        for b, token in zip(seqs, token_ids, strict=True):
            self.new_token_ids[b][-1] = token
        rows = torch.tensor([ends[b] - 1 for b in seqs], device=self.input_ids.device)
        self.input_ids[rows] = torch.tensor(token_ids, dtype=torch.int64, device=rows.device)

    def prefill_segments(self) -> list[tuple[int, int, int]]:
        """``(sequence, first flat token, new tokens)`` for every sequence on the prefill path."""
        segments, start = [], 0
        for b, n in enumerate(self.query_lens):
            if n > 1:
                segments.append((b, start, n))
            start += n
        return segments
