"""The paged MLA latent cache: one pool per layer of ``[num_pages, page_size, kv_cache_dim]``.

A token's entry is its normalised compressed kv (``kv_lora_rank``) followed by its rotated shared
rope key (``qk_rope_head_dim``): 576 values for Kimi, 70,272 bytes per token over 61 bf16 layers.
"""

from __future__ import annotations

import torch

from kimi_grpc.config import EngineConfig, ModelConfig

DEFAULT_PAGE_SIZE = 64
CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024**3


def kv_cache_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for the latent cache: ``kv_cache_memory`` if set, else a share of the free GPU
    memory (after the weights are loaded), else 2 GiB on the CPU."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_cache_memory_fraction)
    return CPU_DEFAULT_KV_CACHE_BYTES


def kv_cache_pages(
    config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """Pages of ``config.page_size`` tokens the budget holds (every TP rank holds every page)."""
    bytes_per_page = config.page_size * LatentKVCache.bytes_per_token(model, dtype)
    num_pages = kv_cache_budget(config, device) // bytes_per_page
    if num_pages < 1:
        raise ValueError(
            f"the kv cache budget holds no page ({bytes_per_page} bytes); raise kv_cache_memory"
        )
    return num_pages


class LatentKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_pages, page_size, config.kv_cache_dim)
        self.pools = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return config.num_hidden_layers * config.kv_cache_dim * dtype.itemsize

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


MOVE_CHUNK_PAGES = 32  # pages per copy: bounds the device temporaries (32 K2.6 pages: 144 MiB)


class HostKVPool:
    """The host tier's bytes: ``[num_pages, layers, page_size, kv_cache_dim]``, page-first, so a
    page's layers sit together. Which page holds what is ``engine.host_cache.HostPageIndex``'s
    business; this class only copies, ``MOVE_CHUNK_PAGES`` at a time (one step may move most of
    the device pool: the temporaries stay bounded).

    Copies run on the current stream, in the order issued: a page saved from the device before
    a fresh allocation overwrites it, a page loaded before the forward that reads it. The pool is
    ordinary (pageable) memory: torch's pinned allocator rounds a size up to a power of two (up
    to 2x the host memory), and these copies are synchronous anyway (overlapping them with the
    forward through a pinned staging buffer is future work).
    """

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        *,
        page_size: int,
        dtype: torch.dtype,
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"a host pool needs at least one page, got {num_pages}")
        shape = (num_pages, config.num_hidden_layers, page_size, config.kv_cache_dim)
        self.pages = torch.zeros(shape, dtype=dtype)
        self.bytes_per_page = self.pages[0].numel() * self.pages.element_size()
        self.bytes_saved = 0
        self.bytes_loaded = 0

    @staticmethod
    def pages_for_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype, size: int) -> int:
        return size // (page_size * LatentKVCache.bytes_per_token(config, dtype))

    def save(self, pools: list[torch.Tensor], moves: list[tuple[int, int]]) -> None:
        """Device page -> host page for each ``(device_page, host_page)``."""
        device = pools[0].device
        for at in range(0, len(moves), MOVE_CHUNK_PAGES):
            chunk = moves[at : at + MOVE_CHUNK_PAGES]
            src = torch.tensor([d for d, _ in chunk], dtype=torch.int64, device=device)
            dst = torch.tensor([h for _, h in chunk], dtype=torch.int64)
            for layer, pool in enumerate(pools):  # [n, P, D] per layer
                self.pages[:, layer].index_copy_(0, dst, pool.index_select(0, src).to("cpu"))
        self.bytes_saved += len(moves) * self.bytes_per_page

    def load(self, pools: list[torch.Tensor], moves: list[tuple[int, int]]) -> None:
        """Host page -> device page for each ``(host_page, device_page)``."""
        device = pools[0].device
        for at in range(0, len(moves), MOVE_CHUNK_PAGES):
            chunk = moves[at : at + MOVE_CHUNK_PAGES]
            src = torch.tensor([h for h, _ in chunk], dtype=torch.int64)
            dst = torch.tensor([d for _, d in chunk], dtype=torch.int64, device=device)
            pages = self.pages.index_select(0, src).to(device)  # [n, L, P, D]
            for layer, pool in enumerate(pools):
                pool.index_copy_(0, dst, pages[:, layer])
        self.bytes_loaded += len(moves) * self.bytes_per_page
