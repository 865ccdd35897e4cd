"""The typed, versioned wire format rank 0 broadcasts to the other tensor-parallel ranks.

Nothing here is pickled. A message is one fixed-size int64 header, then (for ``STEP`` only) one
int64 payload whose length the header gives:

    header  [11] int64 = MAGIC, VERSION, op, step_seq, B, N, P, page_size, M, S, L
    payload [N + 3B + P + M + 2S + 2L] int64 = new token ids (N, sequence after sequence)
                                | query_lens (B) | context_lens (B) | table_lens (B)
                                | block-table pages (P, sequence after sequence)
                                | media rows (M: flat tokens that take vision embeddings)
                                | host-tier saves (S pairs: device page, host page)
                                | host-tier loads (L pairs: host page, device page)

``B`` sequences, ``N`` new tokens, ``P`` pages in all block tables, ``M`` media rows (their
``[M, hidden]`` embeddings follow as a tensor broadcast inside the forward, on the model's
group). A receiver that reads another magic or version refuses the message (a worker from a
different build must not run garbage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from itertools import accumulate

import torch

MAGIC = 0x4B494D49  # "KIMI"
VERSION = 3
HEADER_LEN = 11


class Op(IntEnum):
    STEP = 1  # run one forward over the batch in the payload
    HEARTBEAT = 2  # rank 0 is alive and idle; no payload
    SHUTDOWN = 3  # leave the loop and exit 0


class StepFormatError(RuntimeError):
    """A message this build cannot read: wrong magic, version, op or sizes."""


@dataclass(frozen=True)
class StepMessage:
    op: Op
    seq: int = 0  # rank 0's message counter, checked for gaps by the receivers
    token_ids: list[list[int]] = field(default_factory=list)  # [B][query_len]
    context_lens: list[int] = field(default_factory=list)  # [B]
    block_tables: list[list[int]] = field(default_factory=list)  # [B][pages]
    page_size: int = 0
    media_rows: list[int] = field(default_factory=list)  # [M]
    kv_saves: list[tuple[int, int]] = field(default_factory=list)  # [S] (device, host)
    kv_loads: list[tuple[int, int]] = field(default_factory=list)  # [L] (host, device)


@dataclass(frozen=True)
class Header:
    op: Op
    seq: int
    num_seqs: int  # B
    num_tokens: int  # N
    num_pages: int  # P
    page_size: int
    num_media_rows: int  # M
    num_saves: int  # S
    num_loads: int  # L

    @property
    def payload_len(self) -> int:
        moves = 2 * (self.num_saves + self.num_loads)
        return self.num_tokens + 3 * self.num_seqs + self.num_pages + self.num_media_rows + moves


def encode(msg: StepMessage) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(header [11] int64, payload [N + 3B + P + M + 2S + 2L] int64 or None)`` on the CPU."""
    tables = msg.block_tables
    ids = [t for seq in msg.token_ids for t in seq]
    pages = [p for table in tables for p in table]
    b = len(msg.token_ids)
    if not len(msg.context_lens) == len(tables) == b:
        raise ValueError(f"{b} sequences but {len(msg.context_lens)} lengths, {len(tables)} tables")
    header = torch.tensor(
        [
            *(MAGIC, VERSION, int(msg.op), msg.seq),
            *(b, len(ids), len(pages), msg.page_size, len(msg.media_rows)),
            *(len(msg.kv_saves), len(msg.kv_loads)),
        ],
        dtype=torch.int64,
    )
    if msg.op is not Op.STEP:
        return header, None
    query_lens = [len(seq) for seq in msg.token_ids]
    table_lens = [len(table) for table in tables]
    payload = torch.tensor(
        [
            *ids,
            *query_lens,
            *msg.context_lens,
            *table_lens,
            *pages,
            *msg.media_rows,
            *(x for pair in msg.kv_saves for x in pair),
            *(x for pair in msg.kv_loads for x in pair),
        ],
        dtype=torch.int64,
    )
    return header, payload


def decode_header(header: torch.Tensor) -> Header:
    values = header.tolist()
    if len(values) != HEADER_LEN or values[0] != MAGIC:
        raise StepFormatError(f"not a kimi-grpc step header: {values[:2]}")
    if values[1] != VERSION:
        raise StepFormatError(
            f"step metadata version {values[1]}, this build speaks version {VERSION}: "
            "every rank must run the same kimi-grpc build"
        )
    try:
        op = Op(values[2])
    except ValueError:
        raise StepFormatError(f"unknown step op {values[2]}") from None
    parsed = Header(op, *values[3:])
    sizes = (parsed.num_seqs, parsed.num_tokens, parsed.num_pages, parsed.page_size)
    if min(*sizes, parsed.num_media_rows, parsed.num_saves, parsed.num_loads) < 0:
        raise StepFormatError(f"negative sizes in step header {values}")
    return parsed


def decode(header: Header, payload: torch.Tensor | None) -> StepMessage:
    """The message for ``header`` (and, for STEP, its payload)."""
    if header.op is not Op.STEP:
        return StepMessage(header.op, header.seq)
    if payload is None or payload.numel() != header.payload_len:
        got = None if payload is None else payload.numel()
        raise StepFormatError(f"step payload holds {got} values, header says {header.payload_len}")
    values = payload.tolist()
    b, n = header.num_seqs, header.num_tokens
    ids = values[:n]
    query_lens = values[n : n + b]
    context_lens = values[n + b : n + 2 * b]
    table_lens = values[n + 2 * b : n + 3 * b]
    at = n + 3 * b
    pages = values[at : at + header.num_pages]
    at += header.num_pages
    media_rows = values[at : at + header.num_media_rows]
    at += header.num_media_rows
    saves = _pairs(values[at : at + 2 * header.num_saves])
    loads = _pairs(values[at + 2 * header.num_saves :])
    if sum(query_lens) != n or sum(table_lens) != header.num_pages:
        raise StepFormatError("step payload lengths do not add up to the header's sizes")
    if not all(0 <= row < n for row in media_rows):
        raise StepFormatError(f"step media rows outside the step's {n} tokens")
    return StepMessage(
        Op.STEP,
        header.seq,
        token_ids=_split(ids, query_lens),
        context_lens=context_lens,
        block_tables=_split(pages, table_lens),
        page_size=header.page_size,
        media_rows=media_rows,
        kv_saves=saves,
        kv_loads=loads,
    )


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    if min(flat, default=0) < 0:
        raise StepFormatError("negative page ids in the step's host-tier moves")
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
    ends = list(accumulate(lengths))
    return [flat[end - n : end] for n, end in zip(lengths, ends, strict=True)]
