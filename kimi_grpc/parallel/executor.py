"""One rank's compute: its model shard and the paged latent cache that shard's attention reads.

Every tensor-parallel rank builds its executor the same way — rank 0 in ``engine.llm.load_engine``,
the others in ``parallel.worker.run_worker`` — and runs the same forward on the same
``ForwardBatch``. Invariant: every rank allocates the same number of pages of the same size, so a
page id in a block table names the same slot in every rank's cache; each rank's page count is what
its own budget holds, agreed to the minimum over the ranks before anyone allocates. Under decode
context parallelism a page id names a block of ``page_size × dcp_size`` tokens of which each DCP
rank's local page holds its ``page_size`` (model/context_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kimi_grpc.config import EngineConfig
from kimi_grpc.model import ForwardBatch, KimiForCausalLM
from kimi_grpc.model.kv_cache import HostKVPool, LatentKVCache, kv_cache_pages
from kimi_grpc.parallel.state import ParallelContext

# (this rank's pages, this rank's weight bytes) -> the pages every rank allocates. A collective:
# every rank calls it once, after loading everything it holds.
AgreePages = Callable[[int, int], int]


class RankExecutor:
    def __init__(
        self, model: KimiForCausalLM, config: EngineConfig, agree: AgreePages | None = None
    ) -> None:
        """Sizes and allocates the cache for a loaded shard. Call it after everything else this
        rank holds is loaded: on CUDA the budget is a share of the memory still free.
        ``agree``: None for a single process."""
        self.model = model
        self.weight_bytes = sum(  # this rank's parameters (rank 0 logs every rank's)
            p.numel() * p.element_size() for p in model.parameters()
        )
        num_pages = kv_cache_pages(config, model.config, model.dtype, model.device)
        if agree is not None:
            num_pages = agree(num_pages, self.weight_bytes)
        self.cache = LatentKVCache(
            model.config,
            num_pages,
            page_size=config.page_size,
            dtype=model.dtype,
            device=model.device,
        )
        # The host tier's bytes: every rank keeps its own copy of its pages (under tensor
        # parallelism each rank's latents are the same, but live on its own device); rank 0's
        # block manager decides what moves, the batch carries the moves to every rank.
        self.host: HostKVPool | None = None
        if config.host_kv_cache_memory and config.enable_prefix_caching:
            self.host = HostKVPool(
                model.config,
                HostKVPool.pages_for_bytes(
                    model.config, config.page_size, model.dtype, config.host_kv_cache_memory
                ),
                page_size=config.page_size,
                dtype=model.dtype,
            )

    @classmethod
    def load(
        cls,
        path: str | Path,
        config: EngineConfig,
        *,
        dtype: torch.dtype,
        device: torch.device,
        ctx: ParallelContext | None = None,
        agree: AgreePages | None = None,
    ) -> RankExecutor:
        """Loads this rank's shard of the checkpoint at ``path`` (``ctx``: its place among the
        ranks; None: the whole model), then its cache."""
        model = KimiForCausalLM.from_checkpoint(path, dtype=dtype, device=device, ctx=ctx)
        return cls(model, config, agree)

    @property
    def tokens_per_page(self) -> int:
        """Tokens one block-table page holds across the DCP group (the block manager's page)."""
        return self.cache.page_size * self.model.ctx.dcp_size

    def _check_moves(self, batch: ForwardBatch) -> None:
        """Page ids in range on this rank (a bad id would be a device-side assert on CUDA)."""
        if self.host is None:
            raise ValueError("the batch moves KV pages but this rank has no host tier")
        device_pages, host_pages = self.cache.num_pages, self.host.pages.shape[0]
        pairs = [(d, h) for d, h in batch.kv_saves] + [(d, h) for h, d in batch.kv_loads]
        for device_page, host_page in pairs:
            if not (0 <= device_page < device_pages and 0 <= host_page < host_pages):
                raise ValueError(
                    f"KV move between device page {device_page} and host page {host_page}: "
                    f"this rank has {device_pages} device and {host_pages} host pages"
                )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits ``[num_sequences, vocab]`` at each sequence's last new token; writes the
        batch's latents into the cache. The batch's host-tier moves come first: saves (a page
        about to be overwritten), then loads (pages the forward reads). Under tensor parallelism
        every rank must call it with the same batch (the layers' collectives pair up)."""
        if batch.kv_saves or batch.kv_loads:
            self._check_moves(batch)
            self.host.save(self.cache.pools, batch.kv_saves)
            self.host.load(self.cache.pools, batch.kv_loads)
        return self.model(batch, self.cache.pools)
