"""make-checkpoint presets describe real Kimi K2.6 shapes."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_grpc.checkpoint import CheckpointReader
from kimi_grpc.checkpoint_maker import (
    K26_MEDIA_PROC_CFG,
    PRESETS,
    demo_checkpoint,
    make_checkpoint,
    preset_config,
    random_tensors,
)
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
    assert set(PRESETS) >= {"demo", "demo-vl", "k2-shape-layers2", "bench-2g"}
    assert parse_model_config(preset_config("demo", tokenizer)).vision_config is None


def test_demo_vl_preset_is_the_demo_plus_a_tiny_tower(tokenizer):
    raw = preset_config("demo-vl", tokenizer)
    demo = preset_config("demo", tokenizer)
    assert raw["text_config"] == demo["text_config"]
    c = parse_model_config(raw)
    v = c.vision_config
    assert (v.vt_hidden_size, v.vt_num_attention_heads, v.head_dim) == (96, 4, 24)
    assert (v.vt_num_hidden_layers, v.vt_intermediate_size) == (2, 128)
    assert (v.init_pos_emb_height, v.init_pos_emb_width, v.patch_size) == (64, 64, 14)
    assert v.merge_kernel_size == (2, 2) and v.text_hidden_size == c.hidden_size == 128
    # The media tokens exist in the demo vocabulary; <|media_pad|> is the placeholder.
    ids = [tokenizer.token_id(t) for t in ("<|media_begin|>", "<|media_content|>")]
    ids += [tokenizer.token_id(t) for t in ("<|media_end|>", "<|media_pad|>")]
    assert None not in ids and len(set(ids)) == 4
    assert v.media_placeholder_token_id == ids[3] == tokenizer.token_id("<|media_pad|>")
    assert raw["video_placeholder"] == "<|kimi_k25_video_placeholder|>"
    assert raw["vision_config"]["_attn_implementation"] == "flash_attention_2"  # as K2.6 ships


def test_demo_vl_tensors_in_moonshot_layout(tokenizer, tmp_path):
    path = make_checkpoint(tmp_path, "demo-vl", seed=5, max_shard_bytes=512 * 1024)
    tensors = CheckpointReader(path).tensors
    vision = {n: t for n, t in tensors.items() if n.startswith(("vision_tower.", "mm_projector."))}
    c, hidden, inter = 96, 128, 128
    expected = {
        "vision_tower.patch_embed.proj.weight": (c, 3, 14, 14),
        "vision_tower.patch_embed.proj.bias": (c,),
        "vision_tower.patch_embed.pos_emb.weight": (64, 64, c),
        "vision_tower.encoder.final_layernorm.weight": (c,),
        "vision_tower.encoder.final_layernorm.bias": (c,),
        "mm_projector.pre_norm.weight": (c,),
        "mm_projector.pre_norm.bias": (c,),
        "mm_projector.proj.0.weight": (4 * c, 4 * c),
        "mm_projector.proj.0.bias": (4 * c,),
        "mm_projector.proj.2.weight": (hidden, 4 * c),
        "mm_projector.proj.2.bias": (hidden,),
    }
    for i in range(2):
        block = f"vision_tower.encoder.blocks.{i}"
        for norm in ("norm0", "norm1"):
            expected[f"{block}.{norm}.weight"] = expected[f"{block}.{norm}.bias"] = (c,)
        expected |= {
            f"{block}.wqkv.weight": (3 * c, c),
            f"{block}.wqkv.bias": (3 * c,),
            f"{block}.wo.weight": (c, c),
            f"{block}.wo.bias": (c,),
            f"{block}.mlp.fc0.weight": (inter, c),
            f"{block}.mlp.fc0.bias": (inter,),
            f"{block}.mlp.fc1.weight": (c, inter),
            f"{block}.mlp.fc1.bias": (c,),
        }
    assert {n: t.shape for n, t in vision.items()} == expected
    assert {t.dtype for t in vision.values()} == {torch.bfloat16}  # unquantized, like K2.5/K2.6
    assert len({t.file for t in vision.values()}) > 1  # spread over shards behind the index
    # K2.6's media_proc_cfg next to it.
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert preprocessor == {"media_proc_cfg": K26_MEDIA_PROC_CFG}
    assert preprocessor["media_proc_cfg"]["in_patch_limit"] == 16384
    assert preprocessor["media_proc_cfg"]["sample_fps"] == 2.0
    # Text tensors: exactly the demo's for the same seed.
    demo = dict(random_tensors(preset_config("demo", tokenizer), seed=5))
    with_vision = dict(random_tensors(preset_config("demo-vl", tokenizer), seed=5))
    assert set(with_vision) - set(demo) == set(vision)
    assert all(torch.equal(demo[n], with_vision[n]) for n in demo)
    # A text-only preset writes no preprocessor config.
    text_only = make_checkpoint(tmp_path / "demo", "demo", max_shard_bytes=2 * 1024**2)
    assert not (text_only / "preprocessor_config.json").exists()


def test_demo_vl_cached_next_to_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_GRPC_CACHE_DIR", str(tmp_path))
    path = demo_checkpoint(preset="demo-vl")
    assert path.name == "demo-vl-v1-seed0" and path.parent == tmp_path
    assert parse_model_config(json.loads((path / "config.json").read_text())).vision_config
    assert (path / "preprocessor_config.json").exists()
    assert demo_checkpoint(preset="demo-vl") == path  # generated once
    with pytest.raises(ValueError, match="demo or demo-vl"):
        demo_checkpoint(preset="bench-2g")
