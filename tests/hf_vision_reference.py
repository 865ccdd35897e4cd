"""transformers' native Kimi K2.5/K2.6 port (``Kimi_K25ForConditionalGeneration``) loading the
vision tower and projector of one of our checkpoints through its own weight conversion.

transformers keeps its own config spelling and converts Moonshot's tensor names while loading
(``transformers/conversion_mapping.py``, key ``"kimi_k25"``):

Moonshot (checkpoint)                         transformers (``Kimi_K25ForConditionalGeneration``)
vision_tower.patch_embed.proj.*               model.vision_tower.patch_embed.proj.*
vision_tower.patch_embed.pos_emb.weight       model.vision_tower.patch_embed.pos_emb
  [64, 64, C]                                   .position_embeddings
vision_tower.encoder.blocks.N.norm0 / norm1   model.vision_tower.layers.N.norm1 / norm2
vision_tower.encoder.blocks.N.wqkv [3C, C]    model.vision_tower.layers.N.attn.{q,k,v}_proj
  (+ bias [3C])                                 (``Chunk(dim=0)``, then ``PermuteForRope`` on q, k)
vision_tower.encoder.blocks.N.wo              model.vision_tower.layers.N.attn.proj
vision_tower.encoder.blocks.N.mlp.fc0 / fc1   model.vision_tower.layers.N.mlp.fc1 / fc2
vision_tower.encoder.final_layernorm          model.vision_tower.final_layernorm
mm_projector.pre_norm                         model.mm_projector.pre_norm
mm_projector.proj.0 / proj.2                  model.mm_projector.in_proj / out_proj
language_model.model.* / language_model.lm_head   model.language_model.* / lm_head

``PermuteForRope`` reorders each head's rows of q and k from Moonshot's interleaved pairs
``(x0, y0, x1, y1, ...)`` (pair j = rows 2j, 2j+1) to the rotate-half layout (all pair-firsts,
then all pair-seconds), which its ``apply_rotary_pos_emb_vision`` expects; q·k is unchanged.

Config (Moonshot ``vision_config`` -> ``Kimi_K25VisionConfig`` / ``Kimi_K25Config``):
vt_hidden_size -> hidden_size, vt_intermediate_size -> intermediate_size, vt_num_attention_heads
-> num_attention_heads, vt_num_hidden_layers -> num_hidden_layers, init_pos_emb_{height,width,
time} -> pos_emb_{height,width,time}, patch_size, merge_kernel_size; the hard-coded 2D RoPE base
-> rope_parameters {rope_type: axial, rope_theta: 10000}; mm_hidden_size ->
projection_hidden_size, projector_ln_eps -> projection_layer_norm_eps; text_hidden_size ->
text_config.hidden_size; media_placeholder_token_id -> image_token_id.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    CompressedTensorsConfig,
    DeepseekV3Config,
    Kimi_K25Config,
    Kimi_K25ForConditionalGeneration,
)
from transformers.models.kimi_k25 import Kimi_K25VisionConfig
from transformers.utils import logging as hf_logging

from kimi_grpc.config import VisionConfig, load_model_config

VISION_PREFIXES = ("vision_tower.", "mm_projector.")


def hf_config(v: VisionConfig) -> Kimi_K25Config:
    """transformers' config for the vision model ``v`` (+ a tiny random text model of the right
    width, which the vision tests never run)."""
    text = DeepseekV3Config(
        vocab_size=2048,
        hidden_size=v.text_hidden_size,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )
    vision = Kimi_K25VisionConfig(
        patch_size=v.patch_size,
        pos_emb_height=v.init_pos_emb_height,
        pos_emb_width=v.init_pos_emb_width,
        pos_emb_time=v.init_pos_emb_time,
        num_attention_heads=v.vt_num_attention_heads,
        num_hidden_layers=v.vt_num_hidden_layers,
        hidden_size=v.vt_hidden_size,
        intermediate_size=v.vt_intermediate_size,
        hidden_act=v.hidden_act,
        merge_kernel_size=list(v.merge_kernel_size),
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    return Kimi_K25Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_hidden_size=v.mm_hidden_size,
        projection_layer_norm_eps=v.projector_ln_eps,
        image_token_id=v.media_placeholder_token_id,
        tie_word_embeddings=False,
    )


def vision_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every ``vision_tower.*`` / ``mm_projector.*`` tensor of a checkpoint, Moonshot's names."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file_name in weight_map.items():
        if name.startswith(VISION_PREFIXES):
            with safe_open(checkpoint / file_name, "pt") as shard:
                tensors[name] = shard.get_tensor(name)
    return tensors


def build_hf_vision(
    checkpoint: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Kimi_K25ForConditionalGeneration, dict]:
    """Writes ``checkpoint``'s vision tensors, *unconverted*, next to a transformers config in
    ``out_dir`` and loads them with ``from_pretrained`` (which applies the conversion above).
    Returns the model and its loading info (missing / unexpected keys)."""
    v = load_model_config(checkpoint).vision_config
    assert v is not None, f"{checkpoint} has no vision_config"
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config(v).save_pretrained(out_dir)
    save_file(vision_tensors(checkpoint), str(out_dir / "model.safetensors"), {"format": "pt"})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the (unused) text model's missing weights are expected
    try:
        model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
            out_dir, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), info


def build_hf_model(
    checkpoint: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Kimi_K25ForConditionalGeneration, dict]:
    """The *whole* checkpoint (language model included) as transformers loads it: its own
    config for the vision part (:func:`hf_config`) with the checkpoint's ``text_config`` as
    Moonshot ships it (``model_type`` kimi_k2, flat yarn ``rope_scaling``, the compressed-tensors
    ``quantization_config``), and every tensor unconverted, in Moonshot's names, loaded with
    ``from_pretrained`` (its ``kimi_k25`` conversion, experts fused) and the INT4 experts
    dequantized by transformers' compressed-tensors integration (``dequantize=True``).

    One change to the tensors: the INT4 ``weight_scale`` tensors are written as float32 (bf16 ->
    float32 is exact). transformers' dequantize op decompresses in the scale's dtype, so with
    the shipped bf16 scales it leaves the experts in bfloat16, each ``q * scale`` rounded
    (~2e-3 relative); with float32 scales they are the exact ``q * scale``, which is what a
    float32 model of this checkpoint is."""
    v = load_model_config(checkpoint).vision_config
    assert v is not None, f"{checkpoint} has no vision_config"
    raw = json.loads((checkpoint / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_config(v).to_dict()
    config["text_config"] = raw["text_config"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file_name in sorted(set(weight_map.values())):
        with safe_open(checkpoint / file_name, "pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = shard.get_tensor(name)
                tensors[name] = tensor.float() if name.endswith(".weight_scale") else tensor
    assert set(tensors) == set(weight_map)
    save_file(tensors, str(out_dir / "model.safetensors"), {"format": "pt"})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used"
            warnings.simplefilter("ignore", UserWarning)
            model, info = Kimi_K25ForConditionalGeneration.from_pretrained(
                out_dir,
                dtype=dtype,
                output_loading_info=True,
                quantization_config=CompressedTensorsConfig(dequantize=True),
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), info
