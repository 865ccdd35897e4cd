"""The vision model's loading, input checks and building blocks (transformers parity:
tests/test_vision_parity.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from kimi_grpc.checkpoint import CheckpointError, CheckpointReader
from kimi_grpc.checkpoint_maker import (
    make_checkpoint,
    preset_config,
    random_tensors,
    write_checkpoint,
)
from kimi_grpc.config import VisionConfig, load_model_config
from kimi_grpc.model.vision import (
    KimiVisionModel,
    Rope2D,
    apply_rope_2d,
    sincos_time_table,
)
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir

K25_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("demo-vl"), "demo-vl", seed=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return KimiVisionModel.from_checkpoint(checkpoint, dtype=torch.float32)


def write_variant(tmp_path, rename: dict[str, str | None]):
    """demo-vl with some vision tensors renamed (or dropped: None)."""
    tokenizer = KimiTokenizer.from_dir(demo_tokenizer_dir())
    config = preset_config("demo-vl", tokenizer)
    tensors = (
        (rename.get(name, name), tensor)
        for name, tensor in random_tensors(config, seed=1)
        if rename.get(name, name) is not None
    )
    return write_checkpoint(tmp_path, config, tensors, tokenizer_dir=demo_tokenizer_dir())


def test_real_k26_widths_match_the_checkpoint_table():
    """At K2.6's widths the tensors the model reads are spec §2's, with its parameter counts."""
    model = KimiVisionModel(VisionConfig(), device="meta")
    specs = model.weight_specs()
    assert specs["vision_tower.patch_embed.proj.weight"].shape == (1152, 3, 14, 14)
    assert specs["vision_tower.patch_embed.pos_emb.weight"].shape == (64, 64, 1152)
    assert specs["vision_tower.encoder.blocks.26.wqkv.weight"].shape == (3456, 1152)
    assert specs["vision_tower.encoder.blocks.26.mlp.fc0.weight"].shape == (4304, 1152)
    assert specs["mm_projector.proj.0.weight"].shape == (4608, 4608)
    assert specs["mm_projector.proj.2.weight"].shape == (7168, 4608)
    assert "vision_tower.encoder.blocks.27.wqkv.weight" not in specs
    counts = {"vision_tower.": 0, "mm_projector.": 0}
    for name, spec in specs.items():
        counts[name[: name.index(".") + 1]] += math.prod(spec.shape)
    assert counts == {"vision_tower.": 416_866_032, "mm_projector.": 54_277_888}
    # time_weight and the RoPE angles are computed, never read from the checkpoint.
    assert not any("time_weight" in name or "rope" in name for name in specs)


def test_loads_every_tensor_as_stored(checkpoint, model):
    reader = CheckpointReader(checkpoint)
    vision = [n for n in reader.tensors if n.startswith(("vision_tower.", "mm_projector."))]
    assert sorted(vision) == sorted(model.weight_specs())
    params = dict(model.named_parameters())
    from safetensors import safe_open

    for name in vision:
        with safe_open(reader.tensors[name].file, "pt") as shard:
            assert torch.equal(params[name], shard.get_tensor(name).float()), name


def test_k25_ignore_list_still_loads_unquantized(checkpoint, tmp_path):
    """K2.5's quantization ignore list does not name the vision modules; they are bf16 anyway
    and are built unquantized."""
    copy = tmp_path / "k25"
    shutil.copytree(checkpoint, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw["text_config"]["quantization_config"]["ignore"] = K25_IGNORE
    (copy / "config.json").write_text(json.dumps(raw))
    config = load_model_config(copy)
    assert config.quantization.is_quantized("vision_tower.encoder.blocks.0.wqkv")
    model = KimiVisionModel.from_checkpoint(copy, dtype=torch.float32)
    assert model.vision_tower.encoder.blocks[0].wqkv.weight.dtype == torch.float32
    px = torch.randn(4 * 6 * 3 * 14 * 14).view(-1, 3, 14, 14)
    assert model(px, [(1, 4, 6)])[0].shape == (6, 128)


def test_quantized_or_missing_vision_tensors_are_refused(tmp_path):
    wqkv = "vision_tower.encoder.blocks.1.wqkv.weight"
    packed = write_variant(tmp_path / "packed", {wqkv: wqkv.replace("weight", "weight_packed")})
    with pytest.raises(CheckpointError, match="must be stored unquantized"):
        KimiVisionModel.from_checkpoint(packed)
    missing = write_variant(tmp_path / "missing", {"mm_projector.proj.2.bias": None})
    with pytest.raises(CheckpointError, match=r"missing tensor mm_projector\.proj\.2\.bias"):
        KimiVisionModel.from_checkpoint(missing)


def test_text_only_checkpoint_has_no_vision_model(tmp_path):
    path = make_checkpoint(tmp_path, "demo", max_shard_bytes=2 * 1024**2)
    with pytest.raises(CheckpointError, match="no vision_config"):
        KimiVisionModel.from_checkpoint(path)


@pytest.mark.parametrize(
    ("grids", "n_patches", "message"),
    [
        ([(5, 4, 4)], 80, "exceeds init_pos_emb_time=4"),
        ([(1, 5, 4)], 20, "multiple of the 2x2 merge kernel"),
        ([(1, 514, 2)], 1028, "exceeds the 2D RoPE table 512x512"),
        ([(1, 4, 4)], 15, r"pixel_values has shape \[15, 3, 14, 14\]"),
        ([], 0, "empty"),
        ([(1, 4)], 16, "three positive integers"),
        ([(0, 4, 4)], 0, "three positive integers"),
    ],
)
def test_bad_inputs_are_refused(model, grids, n_patches, message):
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(n_patches, 3, 14, 14), grids)


def test_grid_as_tensor_and_bf16_output(checkpoint, model):
    grids = [(1, 4, 6), (2, 2, 4)]
    px = torch.randn(sum(t * h * w for t, h, w in grids), 3, 14, 14)
    as_list = model(px, grids)
    as_tensor = model(px, torch.tensor(grids))
    assert all(torch.equal(a, b) for a, b in zip(as_list, as_tensor, strict=True))
    assert [tuple(e.shape) for e in as_list] == [(6, 128), (2, 128)]
    bf16 = KimiVisionModel.from_checkpoint(checkpoint)  # default: bfloat16
    out = bf16(px, grids)
    assert out[0].dtype == torch.bfloat16 and bf16.dtype == torch.bfloat16
    assert float((out[0].float() - as_list[0]).abs().max() / as_list[0].abs().max()) < 0.05
    # Casting a loaded model afterwards is the same model (the RoPE frequencies stay fp32).
    cast = KimiVisionModel.from_checkpoint(checkpoint, dtype=torch.float32).to(torch.bfloat16)
    assert cast.dtype == torch.bfloat16
    assert torch.equal(cast(px[:24], grids[:1])[0], out[0])


# ---- building blocks against Moonshot's own formulation (modeling_kimi_k25.py) -------------------
def moonshot_sincos(embed_dim: int, t_size: int) -> np.ndarray:
    """``get_1d_sincos_pos_embed`` of Moonshot's remote code (numpy fp32)."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", np.arange(t_size, dtype=np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_time_table_is_moonshots_sincos():
    ours = sincos_time_table(1152, 4)
    torch.testing.assert_close(ours, torch.from_numpy(moonshot_sincos(1152, 4)).float())
    assert torch.equal(ours[0], torch.cat([torch.zeros(576), torch.ones(576)]))


def test_rope_is_moonshots_complex_rotation_width_first():
    """``Rope2DPosEmbRepeated`` + ``apply_rope``: freqs_cis[r, c] = (cis(c·f0), cis(r·f0),
    cis(c·f1), ...) on adjacent (real, imag) pairs, repeated for every frame."""
    d, t, h, w = 24, 2, 6, 10
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 4)[: d // 4].float() / d))
    flat = torch.arange(h * w).float()
    x_cis = torch.polar(torch.ones(h * w, d // 4), torch.outer(flat % w, freqs))
    y_cis = torch.polar(torch.ones(h * w, d // 4), torch.outer(flat // w, freqs))
    freqs_cis = torch.stack([x_cis, y_cis], dim=-1).reshape(h * w, d // 2).repeat(t, 1)
    q = torch.randn(t * h * w, 3, d)
    expected = torch.view_as_real(
        torch.view_as_complex(q.view(*q.shape[:-1], -1, 2)) * freqs_cis[:, None]
    ).flatten(-2)
    config = VisionConfig(vt_hidden_size=3 * d, vt_num_attention_heads=3, mm_hidden_size=3 * d)
    cos, sin = Rope2D(config).cos_sin([(t, h, w)], torch.device("cpu"))
    torch.testing.assert_close(apply_rope_2d(q, cos, sin), expected, rtol=1e-6, atol=1e-6)
    # bf16 inputs rotate in fp32 and come back in bf16.
    assert apply_rope_2d(q.bfloat16(), cos, sin).dtype == torch.bfloat16
