"""Multi-head Latent Attention (DeepSeek-V2/V3 MLA) over a paged latent cache.

Per token the cache holds only ``c_kv`` (the RMS-normalised compressed kv, ``kv_lora_rank``=512)
and the rotated shared rope key ``k_pe`` (64): 576 values, whatever the head count.

* Prefill (``query_len > 1``): decompress the context's latents with ``kv_b_proj`` into per-head
  ``k_nope``/``v`` and run causal attention of the new queries over the whole context.
* Decode (``query_len == 1``, absorbed): fold ``W_UK`` into the query
  (``q_lat[h] = q_nope[h] @ W_UK[h]``, 512 wide), attend directly over the cached latents with
  ``ops.mla_decode``, then apply ``W_UV`` to the latent output. No per-head keys are materialised.

Heads are split across tensor-parallel ranks (``q_b_proj``/``kv_b_proj`` column-parallel,
``o_proj`` row-parallel); the latent projections are replicated. The cache is replicated too,
unless decode context parallelism shards it by token over a DCP group of ranks
(model/context_parallel.py): then decode all-gathers the group's absorbed queries, attends over
the local share and merges the partials by their LSE in one reduce-scatter back to the heads'
owners; prefill all-gathers the context's latents (each rank wrote only its own tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc import ops
from kimi_grpc.checkpoint import TensorSpec
from kimi_grpc.config import ModelConfig
from kimi_grpc.model.context_parallel import merge_weights
from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.linear import Linear
from kimi_grpc.model.norm import RMSNorm
from kimi_grpc.model.rope import RotaryEmbedding, apply_rope
from kimi_grpc.parallel import ParallelContext


class MLAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        name: str,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        c = config
        if c.num_attention_heads % ctx.tp_size:
            raise ValueError(
                f"num_attention_heads={c.num_attention_heads} is not divisible by "
                f"tensor_parallel_size={ctx.tp_size}"
            )
        self.num_heads = c.num_attention_heads // ctx.tp_size  # local heads
        self.ctx = ctx
        self.nope_dim, self.rope_dim, self.v_dim = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.kv_lora_rank = c.kv_lora_rank
        self.q_lora_rank = c.q_lora_rank
        self.scale = c.softmax_scale
        h, qk = c.hidden_size, c.qk_head_dim

        def linear(proj: str, n_in: int, n_out: int, mode: str) -> Linear:
            q = c.quantization
            q = q if q is not None and q.is_quantized(f"{name}.{proj}") else None
            return Linear(n_in, n_out, parallel=mode, ctx=ctx, dtype=dtype, device=device, quant=q)

        heads = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = linear("q_proj", h, heads * qk, "column")
        else:
            self.q_a_proj = linear("q_a_proj", h, c.q_lora_rank, "replicated")
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype=dtype, device=device)
            self.q_b_proj = linear("q_b_proj", c.q_lora_rank, heads * qk, "column")
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", h, c.kv_cache_dim, "replicated")
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype=dtype, device=device)
        self.kv_b_proj = linear(
            "kv_b_proj", c.kv_lora_rank, heads * (c.qk_nope_head_dim + c.v_head_dim), "column"
        )
        self.o_proj = linear("o_proj", heads * c.v_head_dim, h, "row")

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, nope, kv_lora]`` and ``W_UV [H, v, kv_lora]``: views of kv_b_proj's weight."""
        w = self.kv_b_proj.dense_weight().view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        rope: RotaryEmbedding,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        # x: [N, hidden]; kv_cache: [num_pages, page_size, kv_lora + rope] -> [N, hidden]
        n = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent = self.kv_a_proj_with_mqa(x)  # [N, kv_lora + rope]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        cos, sin = rope.cos_sin(batch.positions, x.dtype)
        q_pe = apply_rope(q_pe, cos, sin)  # [N, H, rope]
        k_pe = apply_rope(k_pe, cos, sin)  # [N, rope]
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)
        if batch.kv_rows is not None:  # DCP: this rank stores only the tokens it owns
            latent = latent[batch.kv_rows]
        kv_cache.view(-1, kv_cache.shape[-1])[batch.slot_mapping] = latent.to(kv_cache.dtype)

        out = x.new_empty(n, self.num_heads, self.v_dim)
        if batch.decode_seqs.numel():
            out[batch.decode_tokens] = self._decode(
                q_nope[batch.decode_tokens], q_pe[batch.decode_tokens], batch, kv_cache
            )
        segments = list(batch.prefill_segments())
        contexts = self._context_latents(batch, [seq for seq, _, _ in segments], kv_cache)
        for (_, start, length), cached in zip(segments, contexts, strict=True):
            out[start : start + length] = self._prefill(
                q_nope[start : start + length], q_pe[start : start + length], cached
            )
        return self.o_proj(out.view(n, -1))

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        # q_nope: [B, H, nope], q_pe: [B, H, rope] -> [B, H, v]
        w_uk, w_uv = self._w_uk_uv()
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)  # [B, H, kv_lora]
        q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, kv_lora + rope]
        if self.ctx.dcp_size == 1:
            o_latent, _ = ops.mla_decode(
                q,
                kv_cache,
                batch.block_tables[batch.decode_seqs],
                batch.context_lens[batch.decode_seqs],
                softmax_scale=self.scale,
                kv_lora_rank=self.kv_lora_rank,
            )
        else:
            o_latent = self._decode_sharded(q, batch, kv_cache)
        return torch.einsum("bhc,hvc->bhv", o_latent, w_uv)

    def _decode_sharded(
        self, q: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        # q: [B, H, kv_lora + rope] for this rank's H heads -> o_latent [B, H, kv_lora]
        n, (b, h, d) = self.ctx.dcp_size, q.shape
        # Every head of the DCP group against this rank's share: [B, N*H, D], rank k's heads
        # in block k.
        q_group = self.ctx.dcp_all_gather(q).transpose(0, 1).reshape(b, n * h, d)
        out = q.new_zeros(b, n * h, self.kv_lora_rank)
        lse = torch.full((b, n * h), float("-inf"), dtype=torch.float32, device=q.device)
        rows = batch.local_decode_rows  # decode sequences with tokens on this rank
        if rows.numel():
            seqs = batch.decode_seqs[rows]
            out[rows], lse[rows] = ops.mla_decode(
                q_group[rows],
                kv_cache,
                batch.block_tables[seqs],
                batch.local_context_lens[seqs],
                softmax_scale=self.scale,
                kv_lora_rank=self.kv_lora_rank,
            )
        weights = merge_weights(self.ctx.dcp_all_gather(lse))[self.ctx.dcp_rank]  # [B, N*H]
        partial = (out.float() * weights[..., None]).view(b, n, h, -1).transpose(0, 1)
        return self.ctx.dcp_reduce_scatter(partial).to(q.dtype)  # [B, H, kv_lora]

    def _prefill(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor
    ) -> torch.Tensor:
        # q_nope: [S, H, nope], q_pe: [S, H, rope] for the S new tokens of a sequence whose
        # cached latents (new ones included) are ``cached`` [L, kv_lora + rope] -> [S, H, v]
        length = cached.shape[0]
        cached = cached.to(q_nope.dtype)
        c_kv, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [L, *]
        kv = self.kv_b_proj(c_kv).view(length, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        s = q.shape[0]
        # Query i sits at position length - s + i and sees keys 0..length - s + i.
        mask = torch.ones(s, length, dtype=torch.bool, device=q.device).tril(length - s)
        # 4-D inputs with one head dim let SDPA pick its fused (flash) kernel, which never
        # materialises the [H, S, L] score matrix; so v is zero-padded to the q/k head dim.
        v = F.pad(v, (0, q.shape[-1] - self.v_dim))
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            scale=self.scale,
        )[0]
        return o.transpose(0, 1)[..., : self.v_dim]

    def _context_latents(
        self, batch: ForwardBatch, seqs: list[int], kv_cache: torch.Tensor
    ) -> list[torch.Tensor]:
        """The cached latents ``[context_len, kv_lora + rope]`` of each of ``seqs``, in position
        order. Under DCP every rank's shares of all of them come in one all-gather per layer."""
        page_size, dim, n = kv_cache.shape[1], kv_cache.shape[-1], self.ctx.dcp_size
        lengths = [batch.context_lens_host[seq] for seq in seqs]
        mine = []
        for seq, length in zip(seqs, lengths, strict=True):
            local = length if n == 1 else batch.local_context_lens_host[seq]
            pages = batch.block_tables[seq, : -(-local // page_size)].long()
            mine.append(kv_cache[pages].reshape(-1, dim)[:local])
        if n == 1 or not seqs:
            return mine
        # Rank r holds positions r, r + N, ...: each sequence's share is padded to ceil(L / N)
        # rows, all sequences' shares are gathered at once as [N, rows, D], and position j*N + r
        # of a sequence is read at [r, its first row + j].
        rows = [-(-length // n) for length in lengths]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        padded = kv_cache.new_zeros(sum(rows), dim)
        for share, start in zip(mine, starts, strict=True):
            padded[start : start + share.shape[0]] = share
        every = self.ctx.dcp_all_gather(padded)  # [N, sum(rows), D]
        return [
            every[:, start : start + r].transpose(0, 1).reshape(-1, dim)[:length]
            for start, r, length in zip(starts, rows, lengths, strict=True)
        ]

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for child in (
            "q_proj",
            "q_a_proj",
            "q_a_layernorm",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_a_layernorm",
            "kv_b_proj",
            "o_proj",
        ):
            module = getattr(self, child, None)
            if module is not None:
                specs.update(module.weight_specs(f"{name}.{child}"))
        return specs
