"""Small random transformers ``DeepseekV3ForCausalLM`` models written as real-layout checkpoints.

The independent reference for the model math: transformers runs the dequantized weights in fp32;
the routed experts are quantized and packed with compressed-tensors itself (not our int4 code).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from kimi_grpc.checkpoint_maker import quantization_config, write_checkpoint
from kimi_grpc.tokenizer import demo_tokenizer_dir

GROUP = 32
INT4_ARGS = QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP
)


@dataclass(frozen=True)
class Variant:
    name: str
    nested: bool  # K2.5/K2.6 layout: text_config + language_model. prefix + rope_parameters
    beta_fast: float
    n_group: int = 1
    topk_group: int = 1
    quantized: bool = True


VARIANTS = [
    Variant("k2-thinking-flat-beta1", nested=False, beta_fast=1.0),
    Variant("k26-nested-beta32", nested=True, beta_fast=32.0),
    Variant("grouped-router-n4-top2", nested=False, beta_fast=32.0, n_group=4, topk_group=2),
]

TEXT = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_nope_head_dim=16,
    qk_rope_head_dim=32,
    v_head_dim=16,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=262144,
    tie_word_embeddings=False,
    bos_token_id=1792,
    eos_token_id=1794,
    pad_token_id=2047,
)


def rope(variant: Variant) -> dict[str, Any]:
    return {
        "beta_fast": variant.beta_fast,
        "beta_slow": 1.0,
        "factor": 64.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }


def config_json(variant: Variant) -> dict[str, Any]:
    """config.json as Moonshot ships it (raw ``rope_scaling`` flat, ``rope_parameters`` nested)."""
    text = dict(
        TEXT,
        n_group=variant.n_group,
        topk_group=variant.topk_group,
        architectures=["DeepseekV3ForCausalLM"],
        model_type="kimi_k2",
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        hidden_act="silu",
        rope_theta=50000.0,
        num_nextn_predict_layers=0,
        moe_layer_freq=1,
    )
    if variant.quantized:
        text["quantization_config"] = quantization_config(GROUP)
    if not variant.nested:
        text["rope_scaling"] = dict(rope(variant), type="yarn")
        return text
    text["model_type"] = "deepseek_v3"
    text["rope_parameters"] = dict(rope(variant), rope_theta=50000.0, rope_type="yarn", type="yarn")
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"},
        "bos_token_id": TEXT["bos_token_id"],
        "eos_token_id": TEXT["eos_token_id"],
        "pad_token_id": TEXT["pad_token_id"],
        "text_config": text,
        "tie_word_embeddings": False,
    }


def _init_(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Weights with enough spread for meaningful logits, rounded to bf16 like a real checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * torch.randn(param.shape, generator=gen)
            elif "embed_tokens" in name:
                value = torch.randn(param.shape, generator=gen)
            else:
                value = torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5
            param.copy_(value.bfloat16().float())
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def _quantize_(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantizes ``weight [out, in]`` in place to its INT4 dequantized value (compressed-tensors)
    and returns the checkpoint tensors."""
    groups = weight.view(weight.shape[0], -1, GROUP)
    scale = (groups.abs().amax(dim=-1) / 7.5).clamp_min(1e-8).bfloat16()
    q = quantize(weight, scale.float(), None, INT4_ARGS, dtype=torch.int8)
    weight.copy_(dequantize(q, scale.float(), None, args=INT4_ARGS, dtype=torch.float32))
    return {
        "weight_packed": pack_to_int32(q, 4),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int32),
    }


def build(variant: Variant, out_dir: Path, seed: int = 0) -> DeepseekV3ForCausalLM:
    """Writes ``variant`` to ``out_dir`` and returns the fp32 transformers model it must match."""
    hf_config = DeepseekV3Config(
        **{k: v for k, v in TEXT.items()},
        n_group=variant.n_group,
        topk_group=variant.topk_group,
        rope_parameters=dict(rope(variant), rope_theta=50000.0, rope_type="yarn"),
        num_mtp_layers=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).float().eval()
    _init_(model, seed)
    tensors: dict[str, torch.Tensor] = {}
    inter = TEXT["moe_intermediate_size"]
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("experts.gate_up_proj"):
                base = name.removesuffix(".gate_up_proj")
                for e in range(tensor.shape[0]):
                    for proj, rows in (
                        ("gate_proj", slice(0, inter)),
                        ("up_proj", slice(inter, None)),
                    ):
                        weight = model.get_parameter(name)[e, rows]
                        packed = _quantize_(weight) if variant.quantized else {"weight": weight}
                        for suffix, value in packed.items():
                            tensors[f"{base}.{e}.{proj}.{suffix}"] = value.clone()
            elif name.endswith("experts.down_proj"):
                base = name.removesuffix(".down_proj")
                for e in range(tensor.shape[0]):
                    weight = model.get_parameter(name)[e]
                    packed = _quantize_(weight) if variant.quantized else {"weight": weight}
                    for suffix, value in packed.items():
                        tensors[f"{base}.{e}.down_proj.{suffix}"] = value.clone()
            elif name.endswith("e_score_correction_bias"):
                tensors[name] = tensor.float().clone()
            else:
                tensors[name] = tensor.bfloat16().clone()
    prefix = "language_model." if variant.nested else ""
    generation = {"max_length": 262144, "eos_token_id": TEXT["eos_token_id"]}
    write_checkpoint(
        out_dir,
        copy.deepcopy(config_json(variant)),
        ((prefix + k, v) for k, v in sorted(tensors.items())),
        generation_config=generation,
        tokenizer_dir=demo_tokenizer_dir(),
        max_shard_bytes=256 * 1024,
    )
    return model
