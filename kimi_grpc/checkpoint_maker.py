"""``kimi-grpc make-checkpoint``: random checkpoints in the exact layout Moonshot ships.

A written checkpoint holds ``config.json`` (nested K2.6 layout with its compressed-tensors
``quantization_config``), ``generation_config.json``, sharded safetensors behind
``model.safetensors.index.json`` (routed experts INT4-packed, everything else bf16, router bias
fp32), the project's demo ``tiktoken.model`` + ``tokenizer_config.json`` and
``chat_template.jinja``.

Presets:

* ``demo`` — the built-in model the server runs without ``--model``: tiny widths but Kimi's
  routing (384 experts, top-8, one shared expert), one dense and two MoE layers;
* ``demo-vl`` — the demo text model (the same tensors for the same seed) plus a tiny MoonViT-3D
  vision tower and patch-merger projector in the real layout (``vision_config``,
  ``vision_tower.*`` / ``mm_projector.*`` bf16 tensors, the 64x64 position table, 14-pixel
  patches, 2x2 merge) and K2.6's ``preprocessor_config.json``;
* ``k2-shape-layers2`` — real K2.6 widths (hidden 7168, 64 heads, MLA ranks 1536/512, 384x2048
  experts) with 2 layers and the demo vocabulary, for GPU benchmarks (~10.7 GB);
* ``bench-2g`` — K2.6 widths with 64 experts (~2.8 GB), for load-time / peak-memory benchmarks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kimi_grpc import envs
from kimi_grpc.config import DEFAULT_VIDEO_PLACEHOLDER, VisionConfig, parse_model_config
from kimi_grpc.int4 import pack_int4
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir

ASSETS = Path(__file__).parent / "assets"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Bumped whenever the demo preset or the generator changes, so cached demos are rebuilt.
DEMO_VERSION = 1
# The same for the demo-vl preset (its text part is the demo's: a DEMO_VERSION bump bumps it too).
DEMO_VL_VERSION = 1

K2_IGNORE = [
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    "re:.*lm_head.*",
    "re:vision_tower.*",
    "re:mm_projector.*",
]

K2_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "attention_bias": False,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 262144,
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
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 64.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "v_head_dim": 128,
    "vocab_size": 163840,
}

DEMO_TEXT: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}

# Text-model overrides of K2_TEXT_CONFIG per preset.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": DEMO_TEXT,
    "demo-vl": DEMO_TEXT,
    "k2-shape-layers2": {"num_hidden_layers": 2},
    "bench-2g": {"num_hidden_layers": 2, "n_routed_experts": 64},
}

# K2.6's ``vision_config`` (kimi-vision-spec.md §1.1); ``text_hidden_size`` follows the preset.
K26_VISION_CONFIG: dict[str, Any] = {
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

# Vision-tower overrides of K26_VISION_CONFIG for the presets that have one. head_dim 96/4 = 24
# keeps the 2D RoPE's 4-way split (72 in the real model); the 64x64 table, 14-pixel patches and
# the 2x2 merge stay real so preprocessing and token counts are K2.6's.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "demo-vl": {
        "vt_hidden_size": 96,
        "mm_hidden_size": 96,
        "vt_intermediate_size": 128,
        "vt_num_attention_heads": 4,
        "vt_num_hidden_layers": 2,
    },
}


# K2.6's preprocessor_config.json ``media_proc_cfg`` (kimi-vision-spec.md §1.2).
K26_MEDIA_PROC_CFG: dict[str, Any] = {
    "in_patch_limit": 16384,
    "patch_size": 14,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_kernel_size": 2,
    "fixed_output_tokens": None,
    "patch_limit_on_one_side": 512,
    "in_patch_limit_each_frame": 4096,
    "in_patch_limit_video": None,
    "sample_fps": 2.0,
    "max_num_frames_each_video": None,
    "temporal_merge_kernel_size": 4,
    "timestamp_mode": "hh:mm:ss.fff",
    "config_type": "media_proc.processors.moonvit.MoonViTMediaProcessorConfig",
}


def quantization_config(group_size: int = 32) -> dict[str, Any]:
    """The compressed-tensors block Kimi K2.6 ships (``text_config.quantization_config``)."""
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": group_size,
        "num_bits": 4,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "group",
        "symmetric": True,
        "type": "int",
    }
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "pack-quantized",
        "ignore": list(K2_IGNORE),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def preset_config(preset: str, tokenizer: KimiTokenizer) -> dict[str, Any]:
    """A complete nested (K2.6-style) ``config.json`` for ``preset`` with the demo vocabulary."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    text = copy.deepcopy(K2_TEXT_CONFIG)
    text.update(PRESETS[preset])
    ids = {
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.im_end_id,
        "pad_token_id": tokenizer.pad_id,
    }
    text.update(ids)
    text["quantization_config"] = quantization_config()
    config = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        **{k: v for k, v in ids.items() if k != "vocab_size"},
        "media_placeholder_token_id": tokenizer.token_id("<|media_pad|>"),
        "text_config": text,
        "tie_word_embeddings": False,
    }
    if preset in VISION_PRESETS:
        vision = copy.deepcopy(K26_VISION_CONFIG)
        vision.update(VISION_PRESETS[preset])
        vision["text_hidden_size"] = text["hidden_size"]
        config.update(
            ignore_index=-100,
            use_unified_vision_chunk=True,
            video_placeholder=DEFAULT_VIDEO_PLACEHOLDER,
            vision_config=vision,
        )
    return config


def random_tensors(config: dict[str, Any], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every text-model tensor of ``config`` with random values, in checkpoint order."""
    parsed = parse_model_config(config)
    c = parsed
    gen = torch.Generator().manual_seed(seed)
    prefix = parsed.weight_prefix
    quant = parsed.quantization

    def normal(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * fan_in**-0.5).to(torch.bfloat16)

    def linear(name: str, n_out: int, n_in: int) -> Iterator[tuple[str, torch.Tensor]]:
        if quant is None or not quant.is_quantized(name):
            yield f"{prefix}{name}.weight", normal(n_out, n_in, fan_in=n_in)
            return
        g = quant.group_size
        q = torch.randint(-8, 8, (n_out, n_in), generator=gen, dtype=torch.int8)
        # |q| averages ~4.5: scales keep the dequantized weight near fan_in^-0.5.
        scale = (torch.rand(n_out, n_in // g, generator=gen) + 0.5) * (n_in**-0.5 / 4.5)
        yield f"{prefix}{name}.weight_packed", pack_int4(q)
        yield f"{prefix}{name}.weight_scale", scale.to(torch.bfloat16)
        yield f"{prefix}{name}.weight_shape", torch.tensor([n_out, n_in], dtype=torch.int32)

    def norm(name: str, dim: int) -> tuple[str, torch.Tensor]:
        return f"{prefix}{name}.weight", (1 + 0.1 * torch.randn(dim, generator=gen)).bfloat16()

    def mlp(name: str, inter: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield from linear(f"{name}.gate_proj", inter, c.hidden_size)
        yield from linear(f"{name}.up_proj", inter, c.hidden_size)
        yield from linear(f"{name}.down_proj", c.hidden_size, inter)

    h = c.hidden_size
    yield f"{prefix}model.embed_tokens.weight", normal(c.vocab_size, h, fan_in=1)
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}"
        attn = f"{layer}.self_attn"
        yield norm(f"{layer}.input_layernorm", h)
        if c.q_lora_rank is None:
            yield from linear(f"{attn}.q_proj", c.num_attention_heads * c.qk_head_dim, h)
        else:
            yield from linear(f"{attn}.q_a_proj", c.q_lora_rank, h)
            yield norm(f"{attn}.q_a_layernorm", c.q_lora_rank)
            yield from linear(
                f"{attn}.q_b_proj", c.num_attention_heads * c.qk_head_dim, c.q_lora_rank
            )
        yield from linear(f"{attn}.kv_a_proj_with_mqa", c.kv_cache_dim, h)
        yield norm(f"{attn}.kv_a_layernorm", c.kv_lora_rank)
        yield from linear(
            f"{attn}.kv_b_proj",
            c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
            c.kv_lora_rank,
        )
        yield from linear(f"{attn}.o_proj", h, c.num_attention_heads * c.v_head_dim)
        yield norm(f"{layer}.post_attention_layernorm", h)
        if not c.is_moe_layer(i):
            yield from mlp(f"{layer}.mlp", c.intermediate_size)
            continue
        yield f"{prefix}{layer}.mlp.gate.weight", normal(c.n_routed_experts, h, fan_in=h)
        bias = 0.05 * torch.randn(c.n_routed_experts, generator=gen)
        yield f"{prefix}{layer}.mlp.gate.e_score_correction_bias", bias.float()
        for e in range(c.n_routed_experts):
            yield from mlp(f"{layer}.mlp.experts.{e}", c.moe_intermediate_size)
        yield from mlp(f"{layer}.mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
    yield norm("model.norm", h)
    yield f"{prefix}lm_head.weight", normal(c.vocab_size, h, fan_in=h)
    if c.vision_config is not None:
        # Its own generator: the text tensors stay those of the same preset without vision.
        yield from random_vision_tensors(c.vision_config, seed)


def random_vision_tensors(v: VisionConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``mm_projector.*`` / ``vision_tower.*`` tensor (bf16, Moonshot's names and shapes;
    the projector comes first, as in K2.5's shards 63/64). Biases and norm shifts are non-zero
    so that every parameter shows in the output."""
    gen = torch.Generator().manual_seed(seed + 0x5649)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def linear(name: str, n_out: int, n_in: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{name}.weight", normal(n_out, n_in, std=n_in**-0.5)
        yield f"{name}.bias", normal(n_out, std=0.05)

    def layer_norm(name: str, dim: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{name}.weight", (1 + 0.1 * torch.randn(dim, generator=gen)).bfloat16()
        yield f"{name}.bias", normal(dim, std=0.05)

    c, p = v.vt_hidden_size, v.patch_size
    yield from layer_norm("mm_projector.pre_norm", v.mm_hidden_size)
    yield from linear("mm_projector.proj.0", v.projector_hidden_size, v.projector_hidden_size)
    yield from linear("mm_projector.proj.2", v.text_hidden_size, v.projector_hidden_size)
    yield "vision_tower.patch_embed.proj.weight", normal(c, 3, p, p, std=(3 * p * p) ** -0.5)
    yield "vision_tower.patch_embed.proj.bias", normal(c, std=0.05)
    table = (v.init_pos_emb_height, v.init_pos_emb_width, c)
    yield "vision_tower.patch_embed.pos_emb.weight", normal(*table, std=0.5)
    for i in range(v.vt_num_hidden_layers):
        block = f"vision_tower.encoder.blocks.{i}"
        yield from layer_norm(f"{block}.norm0", c)
        yield from linear(f"{block}.wqkv", 3 * c, c)
        yield from linear(f"{block}.wo", c, c)
        yield from layer_norm(f"{block}.norm1", c)
        yield from linear(f"{block}.mlp.fc0", v.vt_intermediate_size, c)
        yield from linear(f"{block}.mlp.fc1", c, v.vt_intermediate_size)
    yield from layer_norm("vision_tower.encoder.final_layernorm", c)


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    generation_config: dict[str, Any] | None = None,
    tokenizer_dir: Path | None = None,
    chat_template: Path | None = ASSETS / "chat_template.jinja",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Streams ``tensors`` into ``model-0000i-of-0000n.safetensors`` shards (holding at most one
    shard in memory) and writes the index, configs, tokenizer files and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        path = out / f".shard-{len(written):05d}.tmp"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        written.append((path, list(shards[-1])))
        shards[-1] = {}

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if shards[-1]:
        flush()
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for file_name in ("tiktoken.model", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / file_name, out / file_name)
    if chat_template is not None:
        shutil.copyfile(chat_template, out / "chat_template.jinja")
    return out


def make_checkpoint(
    out_dir: str | Path, preset: str, *, seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    tokenizer_dir = demo_tokenizer_dir()
    tokenizer = KimiTokenizer.from_dir(tokenizer_dir)
    config = preset_config(preset, tokenizer)
    generation = {
        "max_length": config["text_config"]["max_position_embeddings"],
        "eos_token_id": tokenizer.im_end_id,
    }
    out = write_checkpoint(
        out_dir,
        config,
        random_tensors(config, seed),
        generation_config=generation,
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=max_shard_bytes,
    )
    if "vision_config" in config:
        preprocessor = {"media_proc_cfg": copy.deepcopy(K26_MEDIA_PROC_CFG)}
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def demo_checkpoint(seed: int = 0, preset: str = "demo") -> Path:
    """The built-in demo checkpoint (or ``demo-vl``), generated once into
    ``KIMI_GRPC_CACHE_DIR``."""
    versions = {"demo": DEMO_VERSION, "demo-vl": DEMO_VL_VERSION}
    if preset not in versions:
        raise ValueError(f"demo_checkpoint builds {' or '.join(versions)}, not {preset!r}")
    target = Path(envs.CACHE_DIR.get()) / f"{preset}-v{versions[preset]}-seed{seed}"
    if (target / "model.safetensors.index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        # Small shards so even the demo exercises the sharded-index path.
        make_checkpoint(staging, preset, seed=seed, max_shard_bytes=2 * 1024**2)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model.safetensors.index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
