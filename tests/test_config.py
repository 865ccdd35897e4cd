"""config.json parsing for every Kimi variant, and clear errors for everything else."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kimi_grpc.config import ConfigError, load_model_config, parse_model_config
from kimi_grpc.model.rope import yarn_inv_freq

K2_QUANT = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}

# The K2.5 composite config as transformers 5 dumps it (kimi-spec.md §1.3), vision part trimmed.
K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"},
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "model_type": "kimi_k25",
    "pad_token_id": 163839,
    "quantization_config": K2_QUANT,
    "text_config": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 262144,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 64,
        "num_nextn_predict_layers": 0,
        "pad_token_id": 163839,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": K2_QUANT,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 64.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "rope_theta": 50000.0,
            "rope_type": "yarn",
            "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 163840,
    },
    "tie_word_embeddings": False,
}


def k2_thinking_flat() -> dict:
    """A flat K2-Thinking-style config: raw ``rope_scaling`` spelling, beta 1/1, kimi_k2."""
    text = copy.deepcopy(K25["text_config"])
    text.pop("rope_parameters")
    text["model_type"] = "kimi_k2"
    text["rope_scaling"] = {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 64.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    }
    return text


def test_k25_nested_config():
    c = parse_model_config(copy.deepcopy(K25), {"max_length": 262144, "eos_token_id": 163586})
    assert c.weight_prefix == "language_model."
    assert (c.hidden_size, c.num_attention_heads, c.n_routed_experts) == (7168, 64, 384)
    assert c.eos_token_ids == (163585, 163586)  # config.json's and generation_config's
    assert c.rope_scaling.beta_fast == 32.0 and c.rope_scaling.factor == 64.0
    assert c.kv_cache_dim == 576
    assert c.softmax_scale == pytest.approx(0.1446796, rel=1e-6)  # kimi-spec.md §1.6
    assert c.quantization.group_size == 32
    assert [c.is_moe_layer(i) for i in (0, 1, 60)] == [False, True, True]


def test_k26_eos_and_ignore_list():
    raw = copy.deepcopy(K25)
    raw["eos_token_id"] = raw["text_config"]["eos_token_id"] = 163586
    del raw["quantization_config"]
    raw["text_config"]["quantization_config"]["ignore"] = [
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        "re:.*lm_head.*",
        "re:vision_tower.*",
        "re:mm_projector.*",
    ]
    c = parse_model_config(raw)
    assert c.eos_token_ids == (163586,)
    q = c.quantization
    assert q.is_quantized("model.layers.5.mlp.experts.17.down_proj")
    for name in (
        "model.layers.5.mlp.shared_experts.gate_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.5.self_attn.kv_b_proj",
        "lm_head",
    ):
        assert not q.is_quantized(name), name


def test_k25_plain_lm_head_ignore():
    q = parse_model_config(copy.deepcopy(K25)).quantization
    assert not q.is_quantized("lm_head")
    assert q.is_quantized("model.layers.1.mlp.experts.0.gate_proj")


def test_flat_k2_thinking_config_and_rope_betas_differ():
    flat = parse_model_config(k2_thinking_flat(), {"eos_token_id": 163586})
    nested = parse_model_config(copy.deepcopy(K25))
    assert flat.weight_prefix == "" and flat.model_type == "kimi_k2"
    assert flat.rope_scaling.beta_fast == 1.0
    a = yarn_inv_freq(64, 50000.0, flat.rope_scaling)
    b = yarn_inv_freq(64, 50000.0, nested.rope_scaling)
    assert not torch.equal(a, b)  # kimi-spec.md §1.2: K2/K2-Thinking and K2.5/K2.6 differ


@pytest.mark.parametrize("beta_fast", [1.0, 32.0])
def test_yarn_inv_freq_matches_transformers(beta_fast):
    rope = {
        "rope_type": "yarn",
        "rope_theta": 50000.0,
        "factor": 64.0,
        "beta_fast": beta_fast,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    hf = DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=dict(rope))
    expected, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    text = k2_thinking_flat()
    text["rope_scaling"] = dict(rope, type="yarn")
    ours = parse_model_config(text)
    torch.testing.assert_close(
        yarn_inv_freq(64, 50000.0, ours.rope_scaling), expected, rtol=1e-6, atol=0
    )
    assert attention_factor == pytest.approx(1.0)


def test_auto_map_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "configuration_kimi_k25.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
    )
    (tmp_path / "config.json").write_text(json.dumps(K25))
    config = load_model_config(tmp_path)
    assert config.extra["auto_map_ignored"] is True
    assert not marker.exists()


def _mutate(path: str, value, base: dict | None = None) -> dict:
    raw = copy.deepcopy(base if base is not None else K25)
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("architectures", ["LlamaForCausalLM"], "architectures"),
        ("text_config.architectures", ["Qwen2ForCausalLM"], "text_config.architectures"),
        ("text_config.model_type", "qwen2", "text_config.model_type"),
        ("text_config.hidden_size", KeyError, "hidden_size"),
        ("text_config.hidden_size", "7168", "hidden_size"),
        ("text_config.vocab_size", -5, "vocab_size"),
        ("text_config.scoring_func", "softmax", "scoring_func"),
        ("text_config.topk_method", "greedy", "topk_method"),
        ("text_config.hidden_act", "gelu", "hidden_act"),
        ("text_config.n_group", 5, "n_group"),
        ("text_config.topk_group", 2, "topk_group"),
        ("text_config.num_experts_per_tok", 400, "num_experts_per_tok"),
        ("text_config.num_key_value_heads", 8, "num_key_value_heads"),
        ("text_config.first_k_dense_replace", 99, "first_k_dense_replace"),
        ("text_config.attention_bias", True, "attention_bias"),
        ("text_config.qk_rope_head_dim", 63, "qk_rope_head_dim"),
        ("text_config.rope_parameters.rope_type", "linear", "rope_parameters.type"),
        ("text_config.rope_parameters.factor", KeyError, "factor"),
        ("text_config.eos_token_id", 999999, "token id 999999"),
        ("text_config.eos_token_id", "eos", "text_config.eos_token_id"),
        ("text_config.quantization_config.quant_method", "fp8", "quant_method"),
        ("text_config.quantization_config.format", "naive-quantized", "format"),
        (
            "text_config.quantization_config.config_groups.group_0.weights.num_bits",
            8,
            "weights.num_bits",
        ),
        (
            "text_config.quantization_config.config_groups.group_0.weights.symmetric",
            False,
            "weights.symmetric",
        ),
        (
            "text_config.quantization_config.config_groups.group_0.weights.actorder",
            "group",
            "weights.actorder",
        ),
        (
            "text_config.quantization_config.config_groups.group_0.weights.group_size",
            30,
            "group_size",
        ),
        ("text_config.quantization_config.ignore", ["re:(unclosed"], "ignore"),
        ("text_config.moe_intermediate_size", 2040, "moe_intermediate_size"),
        ("text_config", "not an object", "text_config"),
    ],
)
def test_bad_configs_name_the_field(path, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_model_config(_mutate(path, value))


def test_flat_config_rejects_unknown_architecture():
    with pytest.raises(ConfigError, match="architectures"):
        parse_model_config(_mutate("architectures", ["MixtralForCausalLM"], k2_thinking_flat()))


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json does not exist"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)


# ---- vision_config (kimi-vision-spec.md §1.1) ---------------------------------------------------
K26_VISION = {
    "_attn_implementation": "flash_attention_2",
    "init_pos_emb_height": 64,
    "init_pos_emb_time": 4,
    "init_pos_emb_width": 64,
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "mm_hidden_size": 1152,
    "mm_projector_type": "patchmerger",
    "patch_size": 14,
    "pos_emb_type": "divided_fixed",
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-05,
    "text_hidden_size": 7168,
    "video_attn_type": "spatial_temporal",
    "vt_hidden_size": 1152,
    "vt_intermediate_size": 4304,
    "vt_num_attention_heads": 16,
    "vt_num_hidden_layers": 27,
}


def k26_with_vision() -> dict:
    """K2.5's composite config with the real (K2.6) vision part and top-level media fields."""
    raw = copy.deepcopy(K25)
    raw.update(
        ignore_index=-100,
        media_placeholder_token_id=163605,
        use_unified_vision_chunk=True,
        video_placeholder="<|kimi_k25_video_placeholder|>",
        vision_config=copy.deepcopy(K26_VISION),
    )
    return raw


def test_k26_vision_config_parsed():
    c = parse_model_config(k26_with_vision())
    v = c.vision_config
    assert v is not None
    assert (v.vt_hidden_size, v.vt_num_attention_heads, v.head_dim) == (1152, 16, 72)
    assert (v.vt_intermediate_size, v.vt_num_hidden_layers, v.patch_size) == (4304, 27, 14)
    assert (v.init_pos_emb_height, v.init_pos_emb_width, v.init_pos_emb_time) == (64, 64, 4)
    assert v.merge_kernel_size == (2, 2) and v.merge_size == 4
    assert (v.mm_hidden_size, v.projector_hidden_size, v.text_hidden_size) == (1152, 4608, 7168)
    assert v.projector_ln_eps == 1e-5 and v.projector_hidden_act == "gelu"
    assert v.media_placeholder_token_id == 163605
    assert v.video_placeholder == "<|kimi_k25_video_placeholder|>"
    # Moonshot's hard-coded constants, documented as defaults.
    assert (v.rope_theta, v.rope_max_height, v.rope_max_width) == (10000.0, 512, 512)
    assert (v.hidden_act, v.attn_bias, v.layer_norm_eps) == ("gelu_pytorch_tanh", True, 1e-5)
    assert v.num_merged_tokens((4, 48, 86)) == 1032  # spec §4.5: one frame's worth per chunk
    # The text model is the same as without vision.
    text_only = parse_model_config(copy.deepcopy(K25))
    assert text_only.vision_config is None
    assert c.hidden_size == text_only.hidden_size and c.quantization == text_only.quantization


def test_vision_config_defaults_and_k25_spelling():
    raw = k26_with_vision()
    del raw["vision_config"]["_attn_implementation"]  # K2.5 has none
    raw["vision_config"]["mm_hidden_size"] = None  # remote default: = vt_hidden_size
    del raw["vision_config"]["text_hidden_size"]
    raw["vision_config"]["merge_kernel_size"] = 2
    del raw["media_placeholder_token_id"]  # KimiK25VisionConfig's default 163605
    v = parse_model_config(raw).vision_config
    assert v.mm_hidden_size == 1152 and v.text_hidden_size == 7168
    assert v.merge_kernel_size == (2, 2) and v.media_placeholder_token_id == 163605


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("vision_config.pos_emb_type", "learnable", "vision_config.pos_emb_type"),
        ("vision_config.video_attn_type", "spatial", "vision_config.video_attn_type"),
        ("vision_config.merge_type", "sd2", "vision_config.merge_type"),
        ("vision_config.mm_projector_type", "mlp", "vision_config.mm_projector_type"),
        ("vision_config.projector_hidden_act", "relu", "vision_config.projector_hidden_act"),
        ("vision_config._attn_implementation", "paged", "vision_config._attn_implementation"),
        ("vision_config.activation_func", "gelu", "vision_config.activation_func"),
        ("vision_config.attn_bias", False, "vision_config.attn_bias"),
        ("vision_config.vt_hidden_size", "1152", "vision_config.vt_hidden_size"),
        ("vision_config.vt_num_hidden_layers", 0, "vision_config.vt_num_hidden_layers"),
        ("vision_config.vt_num_attention_heads", 7, "vt_num_attention_heads=7"),
        ("vision_config.vt_num_attention_heads", 64, "head_dim 18"),  # 2D RoPE needs d % 4 == 0
        ("vision_config.mm_hidden_size", 1024, "vision_config.mm_hidden_size"),
        ("vision_config.text_hidden_size", 4096, "vision_config.text_hidden_size"),
        ("vision_config.merge_kernel_size", [2, 2, 1], "vision_config.merge_kernel_size"),
        ("vision_config.merge_kernel_size", "2x2", "vision_config.merge_kernel_size"),
        ("vision_config.projector_ln_eps", 0, "vision_config.projector_ln_eps"),
        ("vision_config.init_pos_emb_time", -1, "vision_config.init_pos_emb_time"),
        ("media_placeholder_token_id", 999999, "media_placeholder_token_id"),
        ("media_placeholder_token_id", "pad", "media_placeholder_token_id"),
        ("video_placeholder", "", "video_placeholder"),
        ("vision_config", [1, 2], "vision_config must be an object"),
    ],
)
def test_bad_vision_configs_name_the_field(path, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_model_config(_mutate(path, value, k26_with_vision()))


def test_vision_config_needs_the_nested_layout():
    flat = k2_thinking_flat()
    flat["vision_config"] = copy.deepcopy(K26_VISION)
    with pytest.raises(ConfigError, match="vision_config needs the nested"):
        parse_model_config(flat)
