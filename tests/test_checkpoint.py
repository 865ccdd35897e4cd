"""Checkpoint loading: real layout, corrupt files fail loudly, TP ranks read only their shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_grpc.checkpoint import CheckpointError, CheckpointReader, resolve_model_path
from kimi_grpc.checkpoint_maker import make_checkpoint
from kimi_grpc.config import load_model_config
from kimi_grpc.int4 import dequantize_int4
from kimi_grpc.model import KimiForCausalLM
from kimi_grpc.parallel import ParallelContext

EXPERT = "language_model.model.layers.1.mlp.experts.5.up_proj"
ATTN = "language_model.model.layers.0.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("demo"), "demo", max_shard_bytes=1024**2)


@pytest.fixture
def copy_dir(demo_dir, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(demo_dir, target)
    return target


def index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def rewrite_shard(path: Path, tensor: str, edit) -> None:
    """Applies ``edit(tensors_dict)`` to the shard holding ``tensor``."""
    shard = path / index(path)["weight_map"][tensor]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def load(path: Path) -> KimiForCausalLM:
    return KimiForCausalLM.from_checkpoint(path, dtype=torch.float32)


def test_demo_layout_is_real(demo_dir):
    files = sorted(p.name for p in demo_dir.iterdir())
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tiktoken.model",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert name in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reader = CheckpointReader(demo_dir)
    assert reader.tensors[f"{EXPERT}.weight_packed"].dtype == torch.int32
    assert reader.tensors[f"{EXPERT}.weight_packed"].shape == (32, 128 // 8)
    assert reader.tensors[f"{EXPERT}.weight_scale"].dtype == torch.bfloat16
    assert reader.tensors[f"{EXPERT}.weight_shape"].shape == (2,)
    assert reader.tensors[ATTN].dtype == torch.bfloat16  # attention stays bf16
    bias = "language_model.model.layers.1.mlp.gate.e_score_correction_bias"
    assert reader.tensors[bias].dtype == torch.float32
    config = load_model_config(demo_dir)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (
        384,
        8,
        1,
    )
    assert index(demo_dir)["metadata"]["total_size"] == reader.total_bytes


def test_loaded_weights_equal_checkpoint(demo_dir):
    model = load(demo_dir)
    reader_tensors = {}
    for shard in sorted(demo_dir.glob("*.safetensors")):
        reader_tensors.update(load_file(shard))
    experts = model.layers[1].mlp.experts
    inter = 32
    torch.testing.assert_close(
        experts.w13_packed[5, inter:], reader_tensors[f"{EXPERT}.weight_packed"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.layers[0].self_attn.kv_b_proj.weight, reader_tensors[ATTN].float(), rtol=0, atol=0
    )


def test_extra_tensors_are_ignored(copy_dir):
    rewrite_shard(
        copy_dir,
        ATTN,
        lambda t: t.update({"vision_tower.patch_embed.proj.weight": torch.ones(4, 3)}),
    )
    idx = index(copy_dir)
    idx["weight_map"]["vision_tower.patch_embed.proj.weight"] = idx["weight_map"][ATTN]
    (copy_dir / "model.safetensors.index.json").write_text(json.dumps(idx))
    load(copy_dir)


def test_single_file_checkpoint_without_index(copy_dir):
    tensors = {}
    for shard in sorted(copy_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (copy_dir / "model.safetensors.index.json").unlink()
    save_file(tensors, copy_dir / "model.safetensors")
    load(copy_dir)


def test_missing_tensor(copy_dir):
    rewrite_shard(copy_dir, ATTN, lambda t: t.pop(ATTN))
    idx = index(copy_dir)
    del idx["weight_map"][ATTN]
    (copy_dir / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"missing tensor {ATTN}"):
        load(copy_dir)


def test_index_maps_tensor_to_wrong_shard(copy_dir):
    rewrite_shard(copy_dir, ATTN, lambda t: t.pop(ATTN))
    with pytest.raises(CheckpointError, match=rf"{ATTN} to model-\d+-of-\d+\.safetensors"):
        CheckpointReader(copy_dir)


def test_wrong_shape(copy_dir):
    rewrite_shard(copy_dir, ATTN, lambda t: t.update({ATTN: t[ATTN][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"{ATTN} .* has shape \[\d+, 64\], expected"):
        load(copy_dir)


def test_wrong_dtype(copy_dir):
    name = f"{EXPERT}.weight_packed"
    rewrite_shard(copy_dir, name, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=rf"{name} .* has dtype torch.float32"):
        load(copy_dir)


def test_weight_shape_disagrees(copy_dir):
    name = f"{EXPERT}.weight_shape"
    rewrite_shard(
        copy_dir, name, lambda t: t.update({name: torch.tensor([32, 64], dtype=torch.int32)})
    )
    with pytest.raises(CheckpointError, match=rf"{name} says \[32, 64\], expected \[32, 128\]"):
        load(copy_dir)


def test_truncated_shard(copy_dir):
    shard = copy_dir / index(copy_dir)["weight_map"][ATTN]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor .* \(truncated file"):
        load(copy_dir)


def test_corrupt_header(copy_dir):
    shard = copy_dir / index(copy_dir)["weight_map"][ATTN]
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        load(copy_dir)


def test_index_points_at_missing_file(copy_dir):
    shard = copy_dir / index(copy_dir)["weight_map"][ATTN]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard file {shard.name}, which does not exist"):
        load(copy_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        CheckpointReader(tmp_path)


def test_tensor_parallel_needs_whole_int4_words(demo_dir):
    """Expert slices narrower than a group are regrouped (the demo's I=32 at tp=2 loads), but
    not below one packed int32 word: 32/8 = 4 columns per rank is refused."""
    from kimi_grpc.model.moe import RoutedExperts

    full = load_model_config(demo_dir)
    KimiForCausalLM(full, dtype=torch.float32, ctx=ParallelContext(tp_rank=0, tp_size=2))
    with pytest.raises(ValueError, match="group_size=32; need a multiple of 8"):
        RoutedExperts(
            full,
            name="model.layers.1.mlp.experts",
            ctx=ParallelContext(tp_rank=0, tp_size=8),
            dtype=torch.float32,
            device=torch.device("cpu"),
        )


def test_tensor_parallel_slices_on_wider_experts(tmp_path):
    """A checkpoint whose experts split into whole INT4 groups: compare every rank's slice."""
    from kimi_grpc.checkpoint_maker import PRESETS

    PRESETS["test-tp"] = dict(
        PRESETS["demo"], moe_intermediate_size=128, n_routed_experts=16, num_hidden_layers=2
    )
    try:
        path = make_checkpoint(tmp_path, "test-tp")
    finally:
        del PRESETS["test-tp"]
    full = load(path)
    tp = 2
    inter, heads = 128, full.config.num_attention_heads
    f_attn, f_exp = full.layers[1].self_attn, full.layers[1].mlp.experts
    w13 = dequantize_int4(f_exp.w13_packed, f_exp.w13_scale, 32, torch.float32)
    w2 = dequantize_int4(f_exp.w2_packed, f_exp.w2_scale, 32, torch.float32)
    for rank in range(tp):
        part = KimiForCausalLM(
            full.config, dtype=torch.float32, ctx=ParallelContext(tp_rank=rank, tp_size=tp)
        )
        part.load_weights(CheckpointReader(path))
        p_attn, p_exp = part.layers[1].self_attn, part.layers[1].mlp.experts
        assert p_attn.num_heads == heads // tp
        rows = full.config.qk_head_dim * heads // tp
        assert torch.equal(p_attn.q_b_proj.weight, f_attn.q_b_proj.weight[rank * rows :][:rows])
        cols = full.config.v_head_dim * heads // tp
        assert torch.equal(p_attn.o_proj.weight, f_attn.o_proj.weight[:, rank * cols :][:, :cols])
        assert torch.equal(p_attn.kv_a_proj_with_mqa.weight, f_attn.kv_a_proj_with_mqa.weight)
        lo, hi = rank * inter // tp, (rank + 1) * inter // tp
        p13 = dequantize_int4(p_exp.w13_packed, p_exp.w13_scale, 32, torch.float32)
        p2 = dequantize_int4(p_exp.w2_packed, p_exp.w2_scale, 32, torch.float32)
        assert torch.equal(p13, torch.cat([w13[:, lo:hi], w13[:, inter + lo : inter + hi]], dim=1))
        assert torch.equal(p2, w2[:, :, lo:hi])
        vocab = full.config.vocab_size // tp
        assert torch.equal(part.lm_head.weight, full.lm_head.weight[rank * vocab :][:vocab])


def test_resolve_local_and_bad_model_ids(demo_dir, tmp_path):
    assert resolve_model_path(str(demo_dir)) == demo_dir
    with pytest.raises(CheckpointError, match="neither an existing directory"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(str(tmp_path / "file"))


def test_resolve_hub_repo_offline_from_cache(demo_dir, tmp_path):
    """A repo id resolves through the local HF cache with HF_HUB_OFFLINE=1 (no network), and a
    pinned revision selects that snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--moonshotai--Kimi-K2.6"
    shutil.copytree(demo_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    code = (
        "import sys\n"
        "from kimi_grpc.checkpoint import resolve_model_path, CheckpointError\n"
        "print(resolve_model_path('moonshotai/Kimi-K2.6'))\n"
        f"print(resolve_model_path('moonshotai/Kimi-K2.6', revision='{commit}'))\n"
        "try:\n"
        "    resolve_model_path('moonshotai/Kimi-K2.5')\n"
        "except CheckpointError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == out[1] == str(repo / "snapshots" / commit)
    assert out[2].startswith("ERR cannot resolve moonshotai/Kimi-K2.5@main (HF_HUB_OFFLINE")


def test_loader_that_keeps_a_view_is_refused(demo_dir):
    """Views are only valid during the loader call; keeping one must fail loudly, not leave a
    dangling pointer into an unmapped file."""
    from kimi_grpc.checkpoint import TensorSpec

    reader = CheckpointReader(demo_dir)
    kept = []
    spec = TensorSpec(
        reader.tensors[ATTN].shape, (torch.bfloat16,), lambda src: kept.append(src.read())
    )
    with pytest.raises(RuntimeError, match="kept a view"):
        reader.load({ATTN: spec})
    assert kept[0].float().abs().sum() > 0  # still mapped, still readable
