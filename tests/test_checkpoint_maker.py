"""make-checkpoint presets describe real Kimi K2.6 shapes."""

from __future__ import annotations

import pytest
import torch

from kimi_grpc.checkpoint_maker import PRESETS, preset_config
from kimi_grpc.config import parse_model_config
from kimi_grpc.model import KimiForCausalLM
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer() -> KimiTokenizer:
    return KimiTokenizer.from_dir(demo_tokenizer_dir())


def spec_bytes(model: KimiForCausalLM, name_filter: str = "") -> int:
    total = 0
    for name, spec in model.weight_specs().items():
        if name_filter in name:
            n = 1
            for d in spec.shape:
                n *= d
            total += n * spec.dtypes[0].itemsize
    return total


def test_k2_shape_preset_has_real_widths(tokenizer):
    raw = preset_config("k2-shape-layers2", tokenizer)
    c = parse_model_config(raw)
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (
        7168,
        64,
        1536,
        512,
    )
    assert (c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok) == (384, 2048, 8)
    assert (c.num_hidden_layers, c.vocab_size, c.intermediate_size) == (2, 2048, 18432)
    assert c.rope_scaling.beta_fast == 32.0 and c.routed_scaling_factor == 2.827
    # Built on the meta device: every tensor the loader would read, with K2.6's per-expert shapes.
    model = KimiForCausalLM(c, dtype=torch.bfloat16, device="meta")
    specs = model.weight_specs()
    expert = "language_model.model.layers.1.mlp.experts.383"
    assert specs[f"{expert}.gate_proj.weight_packed"].shape == (2048, 896)
    assert specs[f"{expert}.gate_proj.weight_scale"].shape == (2048, 224)
    assert specs[f"{expert}.down_proj.weight_packed"].shape == (7168, 256)
    assert specs[f"{expert}.down_proj.weight_scale"].shape == (7168, 64)
    attn = "language_model.model.layers.0.self_attn"
    assert specs[f"{attn}.q_b_proj.weight"].shape == (12288, 1536)
    assert specs[f"{attn}.kv_a_proj_with_mqa.weight"].shape == (576, 7168)
    assert specs[f"{attn}.kv_b_proj.weight"].shape == (16384, 512)
    assert specs[f"{attn}.o_proj.weight"].shape == (7168, 8192)
    # One MoE layer's packed experts: 384 x 3 x 2048 x 7168 / 2 bytes = 8.46 GB.
    packed = spec_bytes(model, "weight_packed")
    assert packed == 384 * 3 * 2048 * 7168 // 2


def test_demo_preset_keeps_kimi_routing(tokenizer):
    c = parse_model_config(preset_config("demo", tokenizer))
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (384, 8, 1)
    assert c.weight_prefix == "language_model." and c.quantization is not None
    assert c.eos_token_ids == (tokenizer.im_end_id,)
    assert set(PRESETS) >= {"demo", "k2-shape-layers2", "bench-2g"}
