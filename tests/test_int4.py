"""Our INT4 packing against compressed-tensors itself, bit for bit."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

from kimi_grpc.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4

ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)


def test_worked_examples():
    # kimi-spec.md §2.4: q = -8..-1 -> nibbles 0..7 -> 0x76543210; q = 7 x 8 -> 0xFFFFFFFF = -1.
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [7] * 8], dtype=torch.int8)
    assert pack_int4(q).flatten().tolist() == [0x76543210, -1]


@pytest.mark.parametrize("shape", [(7, 64), (3, 2048), (5, 12), (1, 8)])
def test_pack_matches_compressed_tensors(shape):
    gen = torch.Generator().manual_seed(shape[1])
    q = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    ours = pack_int4(q)
    theirs = pack_to_int32(q, 4)
    assert torch.equal(ours, theirs)
    assert (ours < 0).any() or shape[0] * shape[1] < 64  # high nibbles >= 8 wrap negative


@pytest.mark.parametrize("shape", [(4, 16), (9, 224), (2, 3)])
def test_unpack_matches_compressed_tensors_on_random_words(shape):
    gen = torch.Generator().manual_seed(17)
    words = torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    assert (words < 0).any()
    cols = shape[1] * 8
    for n in (cols, cols - 3):
        theirs = unpack_from_int32(words, 4, torch.Size([shape[0], n]))
        assert torch.equal(unpack_int4(words, n), theirs)
    assert torch.equal(pack_int4(unpack_int4(words, cols)), words)


def test_quantize_and_dequantize_match_compressed_tensors():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen) * 0.05
    q, scale = quantize_int4(w, 32)
    assert scale.dtype == torch.bfloat16 and scale.shape == (48, 8)
    assert torch.equal(q, quantize(w, scale.float(), None, ARGS, dtype=torch.int8))
    packed = pack_int4(q)
    ours = dequantize_int4(packed, scale, 32, torch.float32)
    theirs = dequantize(q, scale.float(), None, args=ARGS, dtype=torch.float32)
    assert torch.equal(ours, theirs)
    # Round-to-nearest error is half a step, except at a group's positive extreme (+7.5 steps
    # clamps to +7): one step there.
    step = scale.float().repeat_interleave(32, dim=1)
    err = (ours - w).abs()
    assert (err <= step + 1e-7).all()
    assert (err > step / 2 + 1e-6).sum() <= 48 * 8  # at most one clamped value per group


def test_bad_inputs():
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="num_columns"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 17)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.zeros(2, 33), 32)
