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

from dataclasses import dataclass

import torch

from kimi_grpc.model.context_parallel import local_length, local_slot


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
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        kv_rows: list[int] = []
        query_lens: list[int] = []
        decode_seqs: list[int] = []
        decode_tokens: list[int] = []
        last: list[int] = []
        rows = zip(token_ids, context_lens, block_tables, strict=True)
        for b, (new, total, pages) in enumerate(rows):
            n = len(new)
            if n == 0 or n > total:
                raise ValueError(f"sequence {b}: {n} new tokens with context length {total}")
            if len(pages) * span < total:
                raise ValueError(f"sequence {b}: {len(pages)} pages cannot hold {total} tokens")
            if n == 1:
                decode_seqs.append(b)
                decode_tokens.append(len(ids))
            for row, pos in enumerate(range(total - n, total), start=len(ids)):
                positions.append(pos)
                if pos % dcp_size == dcp_rank:
                    kv_rows.append(row)
                    slots.append(local_slot(pos, pages, page_size, dcp_size))
            ids.extend(new)
            query_lens.append(n)
            last.append(len(ids) - 1)
        max_pages = max(len(p) for p in block_tables)
        table = torch.zeros(len(block_tables), max_pages, dtype=torch.int32)
        for b, pages in enumerate(block_tables):
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        if media_rows and not all(0 <= r < len(ids) for r in media_rows):
            raise ValueError(f"media rows outside the batch's {len(ids)} tokens")
        local_lens = [local_length(total, dcp_rank, dcp_size) for total in context_lens]
        sharded = dcp_size > 1
        return cls(
            kv_rows=longs(kv_rows) if sharded else None,
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
            positions=longs(positions),
            slot_mapping=longs(slots),
            block_tables=table.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_lens=query_lens,
            context_lens_host=list(context_lens),
            decode_seqs=longs(decode_seqs),
            decode_tokens=longs(decode_tokens),
            logits_indices=longs(last),
            new_token_ids=token_ids,
            block_tables_host=block_tables,
            page_size=page_size,
        )

    def prefill_segments(self) -> list[tuple[int, int, int]]:
        """``(sequence, first flat token, new tokens)`` for every sequence on the prefill path."""
        segments, start = [], 0
        for b, n in enumerate(self.query_lens):
            if n > 1:
                segments.append((b, start, n))
            start += n
        return segments
