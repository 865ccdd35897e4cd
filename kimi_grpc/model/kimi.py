"""The Kimi K2.x text model (DeepSeek-V3 architecture), written to read like the paper.

    h_0 = embed(tokens)
    for each layer:  h += MLA(RMSNorm(h));  h += FFN(RMSNorm(h))
        FFN = dense SwiGLU for the first ``first_k_dense_replace`` layers, MoE afterwards
    logits = lm_head(RMSNorm(h))

Tensor names follow the checkpoint (``model.layers.N.self_attn.q_a_proj.weight`` ...), prefixed
``language_model.`` for the nested K2.5/K2.6 layout; :meth:`KimiForCausalLM.weight_specs` lists
every tensor the model reads, with the shape and dtype it must have.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kimi_grpc.checkpoint import CheckpointReader, TensorSpec
from kimi_grpc.config import ModelConfig, load_model_config
from kimi_grpc.model.attention import MLAttention
from kimi_grpc.model.embedding import VocabParallelEmbedding
from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.mlp import MLP
from kimi_grpc.model.moe import MoE
from kimi_grpc.model.norm import RMSNorm
from kimi_grpc.model.rope import RotaryEmbedding
from kimi_grpc.parallel import ParallelContext


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        *,
        ctx: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        name = f"model.layers.{layer_idx}"
        kw = dict(ctx=ctx, dtype=dtype, device=device)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = MLAttention(config, name=f"{name}.self_attn", **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config, name=f"{name}.mlp", **kw)
        else:
            self.mlp = MLP(
                config.hidden_size,
                config.intermediate_size,
                name=f"{name}.mlp",
                quant=config.quantization,
                **kw,
            )

    def forward(
        self, h: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        # h: [N, hidden] -> [N, hidden]
        h = h + self.self_attn(self.input_layernorm(h), batch, rope, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for child in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            specs.update(getattr(self, child).weight_specs(f"{name}.{child}"))
        return specs


class KimiForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        ctx = ctx or ParallelContext()
        self.config, self.dtype, self.device, self.ctx = config, dtype, device, ctx
        kw = dict(ctx=ctx, dtype=dtype, device=device)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, **kw) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else VocabParallelEmbedding(config.vocab_size, config.hidden_size, **kw)
        )
        self.rope = RotaryEmbedding(config, device)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_caches: list[torch.Tensor], *, all_logits: bool = False
    ) -> torch.Tensor:
        """Runs one step; returns float32 logits ``[B, vocab]`` for each sequence's last new
        token, or ``[N, vocab]`` for every new token when ``all_logits``.

        kv_caches: one ``[num_pages, page_size, kv_lora_rank + rope_dim]`` pool per layer.
        """
        h = self.embed_tokens.embed(batch.input_ids)
        if batch.media_rows is not None:
            h[batch.media_rows] = self._media_embeds(batch)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, batch, self.rope, kv_cache)
        if not all_logits:
            h = h[batch.logits_indices]
        return self.lm_head.logits(self.norm(h))

    def _media_embeds(self, batch: ForwardBatch) -> torch.Tensor:
        """``[M, hidden]`` vision embeddings for ``batch.media_rows``: computed on TP rank 0
        (the vision tower runs there only) and broadcast to the other ranks."""
        embeds = batch.media_embeds
        if embeds is None:  # a worker rank: receive rank 0's
            if self.ctx.tp_rank == 0:
                raise ValueError("the batch has media rows but no media embeddings")
            shape = (len(batch.media_rows_host), self.config.hidden_size)
            embeds = torch.empty(shape, dtype=self.dtype, device=self.device)
        else:
            embeds = embeds.to(device=self.device, dtype=self.dtype).contiguous()
        return self.ctx.broadcast_from_first(embeds)

    def weight_specs(self) -> dict[str, TensorSpec]:
        """Checkpoint tensor name -> what this rank reads from it."""
        specs = self.embed_tokens.weight_specs("model.embed_tokens")
        for i, layer in enumerate(self.layers):
            specs.update(layer.weight_specs(f"model.layers.{i}"))
        specs.update(self.norm.weight_specs("model.norm"))
        if not self.config.tie_word_embeddings:
            specs.update(self.lm_head.weight_specs("lm_head"))
        prefix = self.config.weight_prefix
        return {prefix + name: spec for name, spec in specs.items()}

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> None:
        reader.load(self.weight_specs())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        ctx: ParallelContext | None = None,
    ) -> KimiForCausalLM:
        config = load_model_config(path)
        reader = CheckpointReader(path)
        model = cls(config, dtype=dtype, device=device, ctx=ctx)
        model.load_weights(reader)
        return model.eval()
