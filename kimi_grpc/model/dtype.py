"""The weight dtypes by the names ``--dtype`` / ``LLM(dtype=...)`` accept, and what ``auto`` means.

Every rank resolves the same name the same way: rank 0 for its memory plan, vision tower and
shard, every worker for its shard (the name travels in the JSON ``WorkerSpec``).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU; a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
