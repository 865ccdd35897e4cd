"""MoonViT-3D + projector against transformers' native Kimi K2.5/K2.6 port (float32).

Both sides get the same random weights — the ``demo-vl`` checkpoint our maker writes in
Moonshot's layout, and one at K2.6's real tower widths with one block; transformers loads them
through its own conversion (tests/hf_vision_reference) — and the same pixel values (random
patches of the right shape; preprocessing is tested separately). Compared: the tower's output
(after the final LayerNorm), the temporally pooled 2x2 merge, and the projected embeddings, per
chunk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import Kimi_K25ForConditionalGeneration

from kimi_grpc.checkpoint_maker import (
    K26_VISION_CONFIG,
    make_checkpoint,
    preset_config,
    random_vision_tensors,
    write_checkpoint,
)
from kimi_grpc.config import parse_model_config
from kimi_grpc.model import vision as vision_module
from kimi_grpc.model.vision import KimiVisionModel, tpool_patch_merger
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir
from tests.hf_vision_reference import VISION_PREFIXES, build_hf_vision, vision_tensors

TOLERANCE = 1e-4  # relative (max |diff| / max |reference|), float32

CASES = {
    # (a) exactly the 64x64 table: no interpolation
    "image-64x64": [(1, 64, 64)],
    # (b) odd aspect ratios: the table is bicubically resampled
    "image-10x16": [(1, 10, 16)],
    "image-38x24": [(1, 38, 24)],
    # (c) a full 4-frame video chunk: temporal sin/cos rows, joint attention, mean pool
    "video-4-frames": [(4, 12, 10)],
    # (d) a 1-frame tail chunk of a video: no temporal row (same as an image)
    "video-1-frame-tail": [(1, 12, 10)],
    "video-2-frames-2x2": [(2, 2, 2)],
    # several chunks packed in one call, as the engine batches them
    "mixed-batch": [(1, 10, 16), (4, 6, 8), (3, 4, 6), (1, 2, 2)],
}
# At K2.6's widths (slower on CPU): one of each kind.
K26_CASES = ("image-38x24", "video-4-frames", "video-1-frame-tail", "mixed-batch")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def pixels(grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(seed))


def k26_widths_checkpoint(path, layers: int = 1):
    """K2.6's real tower and projector widths (1152 wide, 16 heads of 72, MLP 4304, projector
    4608) with ``layers`` blocks, over the demo text config; only the vision tensors are written."""
    config = preset_config("demo-vl", KimiTokenizer.from_dir(demo_tokenizer_dir()))
    vision = dict(K26_VISION_CONFIG, vt_num_hidden_layers=layers, text_hidden_size=128)
    config["vision_config"] = vision
    tensors = random_vision_tensors(parse_model_config(config).vision_config, seed=4)
    return write_checkpoint(path, config, tensors, max_shard_bytes=32 * 1024**2)


class Pair(NamedTuple):
    checkpoint: Path
    ours: KimiVisionModel
    hf: Kimi_K25ForConditionalGeneration
    loading_info: dict


def load_pair(checkpoint: Path, hf_dir: Path) -> Pair:
    ours = KimiVisionModel.from_checkpoint(checkpoint, dtype=torch.float32)
    return Pair(checkpoint, ours, *build_hf_vision(checkpoint, hf_dir))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Pair:
    # Small shards: the vision tensors are spread over several files behind the index.
    path = make_checkpoint(
        tmp_path_factory.mktemp("demo-vl"), "demo-vl", seed=3, max_shard_bytes=256 * 1024
    )
    return load_pair(path, tmp_path_factory.mktemp("hf-demo-vl"))


@pytest.fixture(scope="module")
def k26(tmp_path_factory) -> Pair:
    path = k26_widths_checkpoint(tmp_path_factory.mktemp("k26-widths"))
    return load_pair(path, tmp_path_factory.mktemp("hf-k26-widths"))


@pytest.fixture(params=["demo", "k26"], ids=["demo-vl", "k26-widths-1-layer"])
def pair(request) -> Pair:
    return request.getfixturevalue(request.param)


def hf_outputs(hf_model, px: torch.Tensor, grids) -> tuple[torch.Tensor, torch.Tensor, list]:
    """transformers' tower output ``[L, C]``, pooled merge ``[N, 4, C]``, embeddings per chunk."""
    grid = torch.tensor(grids)
    model = hf_model.model
    with torch.no_grad():
        tower = model.vision_tower(px, grid_thw=grid)
        # The rest of Kimi_K25Model.get_image_features, reusing the tower's output.
        embeddings = model.mm_projector(tower.pooler_output).squeeze(1)
    kh, kw = model.vision_tower.merge_kernel_size
    sizes = [h * w // (kh * kw) for _, h, w in grids]
    return tower.last_hidden_state, tower.pooler_output, list(embeddings.split(sizes))


def test_hf_conversion_loads_every_vision_tensor(pair):
    """transformers converts every tensor of Moonshot's layout (none unexpected, none of its
    vision/projector parameters left at their random init), and we read exactly the same set."""
    checkpoint, ours, model, info = pair
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    vision_missing = [k for k in info["missing_keys"] if "vision" in k or "projector" in k]
    assert vision_missing == []
    assert any(k.startswith("model.language_model") for k in info["missing_keys"])  # sanity
    names = set(vision_tensors(checkpoint))
    assert names == set(ours.weight_specs())
    assert all(name.startswith(VISION_PREFIXES) for name in names)
    table = model.model.vision_tower.patch_embed.pos_emb.position_embeddings
    assert torch.equal(table, ours.vision_tower.patch_embed.pos_emb.weight)
    # hf_outputs() is transformers' own get_image_features, split per chunk.
    grids = [(1, 10, 16), (4, 6, 8)]
    px = pixels(grids, seed=1)
    with torch.no_grad():
        api = model.model.get_image_features(px, torch.tensor(grids)).pooler_output
    for a, b in zip(api, hf_outputs(model, px, grids)[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("which", "case"),
    [("demo", case) for case in CASES] + [("k26", case) for case in K26_CASES],
    ids=[f"demo-vl-{case}" for case in CASES] + [f"k26-widths-{case}" for case in K26_CASES],
)
def test_tower_merge_and_embeddings_match_transformers(request, which, case):
    _, ours, hf, _ = request.getfixturevalue(which)
    grids = CASES[case]
    px = pixels(grids, seed=len(grids) + sum(h for _, h, _ in grids))
    ref_tower, ref_merged, ref_embeddings = hf_outputs(hf, px, grids)
    tower = ours.encode(px, grids)
    assert tower.shape == ref_tower.shape == (px.shape[0], ours.config.vt_hidden_size)
    assert rel_err(tower, ref_tower) <= TOLERANCE
    merged = torch.cat(tpool_patch_merger(tower, grids, ours.config.merge_kernel_size))
    assert merged.shape == ref_merged.shape
    assert rel_err(merged, ref_merged) <= TOLERANCE
    embeddings = ours(px, grids)
    assert len(embeddings) == len(ref_embeddings) == len(grids)
    for (_, h, w), got, ref in zip(grids, embeddings, ref_embeddings, strict=True):
        assert got.shape == ref.shape == (h // 2 * w // 2, ours.config.text_hidden_size)
        assert rel_err(got, ref) <= TOLERANCE


def test_item_embeddings_independent_of_batch_neighbours(demo):
    """(e) Item A's embeddings do not change when item B changes (other pixels *and* another
    grid, so every offset after A moves): attention is block-diagonal per chunk."""
    a = [(1, 10, 16)]
    px_a = pixels(a, seed=11)
    batches = {
        "B = 4-frame video": ([(4, 6, 8)], pixels([(4, 6, 8)], seed=12)),
        "B' = 38x24 image": ([(1, 38, 24)], pixels([(1, 38, 24)], seed=13)),
    }
    ours, hf = demo.ours, demo.hf
    alone = ours(px_a, a)[0]
    for grids_b, px_b in batches.values():
        for order in ("A first", "A last"):
            grids = a + grids_b if order == "A first" else grids_b + a
            px = torch.cat([px_a, px_b] if order == "A first" else [px_b, px_a])
            out = ours(px, grids)
            got_a = out[0] if order == "A first" else out[1]
            assert rel_err(got_a, alone) <= 1e-6
            ref = hf_outputs(hf, px, grids)[2]
            for got, expected in zip(out, ref, strict=True):
                assert rel_err(got, expected) <= TOLERANCE
    # ... whereas changing A itself changes A's embeddings.
    assert rel_err(ours(pixels(a, seed=14), a)[0], alone) > 0.1


def _height_first(original):
    def cos_sin(self, grid_thw, device):
        cos, sin = original(self, grid_thw, device)
        swap = lambda x: x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # noqa: E731
        return swap(cos), swap(sin)

    return cos_sin


def _time_row_for_single_frames(original):
    def forward(self, grid_thw):
        pos, start = original(self, grid_thw).clone(), 0
        for t, h, w in grid_thw:
            if t == 1:
                pos[start : start + h * w] += self.time_weight[0]
            start += t * h * w
        return pos

    return forward


def _norm_after_concat(original):
    def forward(self, merged):
        width = merged.shape[1] * merged.shape[2]
        return self.proj(torch.nn.functional.layer_norm(merged.flatten(1), (width,)))

    return forward


MUTATIONS = {
    # Moonshot's docstring says "height axis at 2i"; its code (and transformers') rotates pair
    # 2i by the column (width) index. Following the docstring breaks parity.
    "rope-height-first": (vision_module.Rope2D, "cos_sin", _height_first),
    # time_weight[0] = [0..0, 1..1] is *not* added to images / 1-frame tail chunks.
    "time-row-on-1-frame-chunks": (
        vision_module.DividedFixedPosEmb,
        "forward",
        _time_row_for_single_frames,
    ),
    # The projector normalises each 1152-wide piece before concatenation, not the 4608 vector.
    "projector-norm-after-concat": (
        vision_module.PatchMergerProjector,
        "forward",
        _norm_after_concat,
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_parity_detects_spec_misreadings(demo, monkeypatch, mutation):
    """The comparison is sharp enough to catch each plausible misreading of the spec."""
    owner, attribute, make = mutation
    grids = [(1, 10, 16), (1, 12, 10)]
    px = pixels(grids, seed=21)
    reference = torch.cat(hf_outputs(demo.hf, px, grids)[2])
    assert rel_err(torch.cat(demo.ours(px, grids)), reference) <= TOLERANCE
    monkeypatch.setattr(owner, attribute, make(getattr(owner, attribute)))
    assert rel_err(torch.cat(demo.ours(px, grids)), reference) > 1e-2


def test_bfloat16_tracks_fp32_reference(k26):
    """The serving dtype, at the real widths: our bf16 error against the fp32 reference is of the
    order of transformers' own bf16 run (a lost cast or bf16 RoPE math shows as far larger)."""
    ours_bf16 = KimiVisionModel.from_checkpoint(k26.checkpoint, dtype=torch.bfloat16)
    hf_bf16 = copy.deepcopy(k26.hf).to(torch.bfloat16)
    grids = [(1, 38, 24), (4, 12, 10)]
    px = pixels(grids, seed=31)
    reference = torch.cat(hf_outputs(k26.hf, px, grids)[2])
    baseline = torch.cat(hf_outputs(hf_bf16, px.bfloat16(), grids)[2])
    got = torch.cat(ours_bf16(px, grids))
    assert got.dtype == torch.bfloat16

    def mean_rel(a: torch.Tensor) -> float:
        return float((a.float() - reference).abs().mean() / reference.abs().mean())

    # transformers' own bf16 run sits at ~6e-3 here.
    assert mean_rel(got) <= 1.5 * mean_rel(baseline) + 1e-3
    assert rel_err(got, reference) <= 2 * rel_err(baseline, reference) + 1e-3
