"""MoonViT-3D, the vision tower of Kimi K2.5/K2.6, and its patch-merger projector.

Written to read like shared/docs/kimi-vision-spec.md §3 (Moonshot's ``modeling_kimi_k25.py``).
A batch is a list of *vision chunks*: an image (``t = 1``) or up to ``init_pos_emb_time`` (4)
consecutive frames of a video; chunk ``k`` has ``grid_thw[k] = (t, h, w)`` patches of 14x14.

    x = W_patch · patch + b                                       [L, C]   L = Σ t·h·w, C = 1152
    x += pos2d(h, w)  (+ time[f] for frame f, only if t >= 2)      learned 64x64 table, bicubic
    for each of the 27 blocks:                                       (pre-norm)
        q, k, v = split(W_qkv · LN0(x) + b)                          [L, heads, head_dim] each
        x += W_o · Attn(RoPE2D(q), RoPE2D(k), v) + b                 block-diagonal per chunk
        x += fc1(gelu_tanh(fc0(LN1(x))))
    x = LN_final(x)
    per chunk: mean over t, 2x2 merge                                [h/2 · w/2, 4, C]
    projector: LN per C-piece -> concat 4C -> Linear -> GELU -> Linear  [h/2 · w/2, text_hidden]

Attention never crosses chunks (Moonshot runs ``flash_attn_varlen`` with ``cu_seqlens`` of
``t·h·w`` per chunk); inside a chunk it is non-causal and all frames attend jointly.

Parameter names are the checkpoint's (``vision_tower.encoder.blocks.N.wqkv.weight``,
``mm_projector.proj.0.weight``, ...; no ``language_model.`` prefix), so
:meth:`KimiVisionModel.weight_specs` is the module's own parameter list. The temporal sin/cos
table and the RoPE angles are computed, never loaded. The tower and projector are always built
unquantized, whatever the quantization config's ignore list says (K2.5's omits them; the
checkpoint stores them in bf16). The model holds no tensor-parallel state: every rank that runs
it holds the whole (0.9 GiB bf16) model.

Precision: RoPE angles and rotations and the position tables (bicubic interpolation + temporal
rows) are computed in fp32 and cast once to the model dtype; Moonshot's code interpolates and adds
the tables in bf16, so a bf16 model differs from it by bf16 rounding there.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimi_grpc.checkpoint import (
    FLOAT_DTYPES,
    CheckpointError,
    CheckpointReader,
    TensorSlice,
    TensorSpec,
)
from kimi_grpc.config import VisionConfig, load_model_config

GridTHW = tuple[int, int, int]
# Every tensor of the vision model starts with one of these (Moonshot's layout).
VISION_WEIGHT_PREFIXES = ("vision_tower.", "mm_projector.")


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T + b``, replicated and unquantized (``weight [out, in]``, ``bias [out]``)."""

    def __init__(
        self, n_in: int, n_out: int, *, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = _param(n_out, n_in, dtype=dtype, device=device)
        self.bias = _param(n_out, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """Affine LayerNorm over the last dim (``nn.LayerNorm`` semantics)."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)
        self.bias = _param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


# ---- §3.1-3.3 patch embedding + position embeddings ----------------------------------------------
def sincos_time_table(dim: int, num_frames: int) -> torch.Tensor:
    """``[num_frames, dim]`` fp32: row f = concat(sin(f·ω), cos(f·ω)), ω_j = 10000^(-j/(dim/2))
    (Moonshot's ``get_1d_sincos_pos_embed``: sin half first, cos half second)."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.arange(num_frames, dtype=torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DividedFixedPosEmb(nn.Module):
    """``pos_emb_type: divided_fixed``: a learned 2D table ``weight [H0, W0, C]`` (64x64),
    bicubically resampled to each chunk's (h, w), plus fixed sin/cos rows per frame for video
    chunks of t >= 2 frames (a 1-frame chunk gets none, although ``time[0] = [0..0, 1..1]``)."""

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        c = config
        self.weight = _param(
            c.init_pos_emb_height,
            c.init_pos_emb_width,
            c.vt_hidden_size,
            dtype=dtype,
            device=device,
        )
        time = sincos_time_table(c.vt_hidden_size, c.init_pos_emb_time)
        self.register_buffer("time_weight", time.to(device), persistent=False)  # [T, C] fp32

    def table(self, h: int, w: int) -> torch.Tensor:
        """The 2D table at grid (h, w), row-major over (row, col): ``[h·w, C]`` fp32."""
        table = self.weight.float()  # [H0, W0, C]
        if (h, w) != tuple(table.shape[:2]):
            # F.interpolate defaults: align_corners=False, no antialias, cubic A = -0.75.
            resized = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic")
            table = resized[0].permute(1, 2, 0)
        return table.reshape(h * w, -1)

    def forward(self, grid_thw: Sequence[GridTHW]) -> torch.Tensor:
        """-> ``[Σ t·h·w, C]`` fp32 position embedding of every patch, chunks in order."""
        pos = []
        for t, h, w in grid_thw:
            pos2d = self.table(h, w)  # [h·w, C]
            if t == 1:
                pos.append(pos2d)
            else:  # frame-major: [t, h·w, C]
                time = self.time_weight[:t, None].float()
                pos.append((pos2d[None] + time).flatten(0, 1))
        return torch.cat(pos)


class PatchProjection(nn.Module):
    """Conv2d(3 -> C, kernel = stride = p) applied to one p x p patch (``weight [C, 3, p, p]``,
    the checkpoint's Conv2d layout) == one GEMM on the (c, y, x)-flattened patch:
    ``x = W.view(C, 3·p·p) · vec(patch) + b``."""

    def __init__(
        self, dim: int, patch_size: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = _param(dim, 3, patch_size, patch_size, dtype=dtype, device=device)
        self.bias = _param(dim, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [L, 3, p, p] -> [L, C]
        x = pixel_values.to(self.weight.dtype).flatten(1)
        return F.linear(x, self.weight.flatten(1), self.bias)


class PatchEmbed3d(nn.Module):
    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.proj = PatchProjection(config.vt_hidden_size, config.patch_size, **kw)
        self.pos_emb = DividedFixedPosEmb(config, **kw)

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[GridTHW]) -> torch.Tensor:
        # pixel_values: [L, 3, p, p] -> [L, C]
        x = self.proj(pixel_values)
        return x + self.pos_emb(grid_thw).to(x.dtype)


# ---- §3.4 2D RoPE --------------------------------------------------------------------------------
class Rope2D:
    """Interleaved 2D rotary embedding, shared by all blocks and heads (``Rope2DPosEmbRepeated``).

    head_dim d gives d/2 adjacent pairs ``(q[2j], q[2j+1])`` = (real, imag) and d/4 frequencies
    f_i = θ^(-4i/d). For the patch at grid row r, column c: pair 2i rotates by ``c·f_i`` (width,
    x) and pair 2i+1 by ``r·f_i`` (height, y). Moonshot's docstring says "height axis at 2i"; its
    code (and every port) puts the width first — the code is what the weights were trained with.
    All frames of a chunk share the (r, c) angles: there is no temporal rotation.
    """

    def __init__(self, config: VisionConfig) -> None:
        d = config.head_dim
        dim_range = torch.arange(0, d, 4, dtype=torch.float32)
        # A plain fp32 attribute, not a buffer: casting the model to bf16 must not round it.
        self.inv_freq = 1.0 / (config.rope_theta ** (dim_range / d))  # [d/4]

    def cos_sin(
        self, grid_thw: Sequence[GridTHW], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin ``[Σ t·h·w, d/2]`` fp32 (the angle of each patch's every pair)."""
        angles = []
        inv_freq = self.inv_freq.to(device)
        for t, h, w in grid_thw:
            rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
            cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
            x_angles = cols[:, None] * inv_freq[None, :]  # [h·w, d/4]
            y_angles = rows[:, None] * inv_freq[None, :]
            hw = torch.stack([x_angles, y_angles], dim=-1).flatten(1)  # [h·w, d/2]: x0 y0 x1 y1..
            angles.append(hw.repeat(t, 1))
        theta = torch.cat(angles)
        return theta.cos(), theta.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[L, ..., d]`` (pairs adjacent), cos/sin ``[L, d/2]`` -> rotated ``[L, ..., d]`` in x's
    dtype and layout; the complex product runs in fp32 (``view_as_complex`` in Moonshot's)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


# ---- §3.5-3.6 encoder ----------------------------------------------------------------------------
class VisionMLP(nn.Module):
    """``fc1(gelu_tanh(fc0(x)))`` (``PytorchGELUTanh``)."""

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        c, inter = config.vt_hidden_size, config.vt_intermediate_size
        self.fc0 = Linear(c, inter, bias=True, dtype=dtype, device=device)
        self.fc1 = Linear(inter, c, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block with joint QKV (rows ``[Q; K; V]``, each head-major) and 2D RoPE."""

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        c, eps = config.vt_hidden_size, config.layer_norm_eps
        self.num_heads, self.head_dim = config.vt_num_attention_heads, config.head_dim
        kw = dict(dtype=dtype, device=device)
        self.norm0 = LayerNorm(c, eps, **kw)
        self.wqkv = Linear(c, 3 * c, bias=config.attn_bias, **kw)
        self.wo = Linear(c, c, bias=config.attn_bias, **kw)
        self.norm1 = LayerNorm(c, eps, **kw)
        self.mlp = VisionMLP(config, **kw)

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        # x: [L, C] -> [L, C]
        qkv = self.wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k = apply_rope_2d(qkv[:, :2], cos, sin).unbind(1)  # [L, heads, d] each
        v = qkv[:, 2]
        out = torch.empty_like(q)
        # Block-diagonal: softmax(q kᵀ / √d) v inside each chunk, nothing across chunks. One
        # SDPA call per chunk ([1, heads, n, d]: 4-D inputs take the fused CPU/GPU kernels).
        for start, end in itertools.pairwise(cu_seqlens):
            q_c, k_c, v_c = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(q_c, k_c, v_c)[0].transpose(0, 1)
        return self.wo(out.flatten(1))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        x = x + self.attention(self.norm0(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm1(x))


class MoonViT3dEncoder(nn.Module):
    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            EncoderBlock(config, dtype=dtype, device=device)
            for _ in range(config.vt_num_hidden_layers)
        )
        self.final_layernorm = LayerNorm(
            config.vt_hidden_size, config.layer_norm_eps, dtype=dtype, device=device
        )
        self.rope_2d = Rope2D(config)

    def forward(self, x: torch.Tensor, grid_thw: Sequence[GridTHW]) -> torch.Tensor:
        # x: [L, C] -> [L, C]
        cos, sin = self.rope_2d.cos_sin(grid_thw, x.device)
        cu_seqlens = [0]
        for t, h, w in grid_thw:
            cu_seqlens.append(cu_seqlens[-1] + t * h * w)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.final_layernorm(x)


# ---- §3.7 temporal pool + 2x2 merge --------------------------------------------------------------
def tpool_patch_merger(
    x: torch.Tensor, grid_thw: Sequence[GridTHW], kernel: tuple[int, int]
) -> list[torch.Tensor]:
    """``merge_type: sd2_tpool``. x ``[Σ t·h·w, C]`` -> per chunk ``[h/kh · w/kw, kh·kw, C]``:
    the mean over the chunk's frames of each kh x kw block, sub-vectors ordered (row0, col0),
    (row0, col1), (row1, col0), (row1, col1), blocks row-major."""
    kh, kw = kernel
    out, start = [], 0
    for t, h, w in grid_thw:
        chunk = x[start : start + t * h * w].view(t, h // kh, kh, w // kw, kw, x.shape[-1])
        out.append(chunk.permute(0, 1, 3, 2, 4, 5).mean(dim=0).reshape(-1, kh * kw, x.shape[-1]))
        start += t * h * w
    return out


class MoonViT3d(nn.Module):
    """``vision_tower``: patches -> final-LayerNorm'd patch features ``[L, C]``."""

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed3d(config, dtype=dtype, device=device)
        self.encoder = MoonViT3dEncoder(config, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[GridTHW]) -> torch.Tensor:
        return self.encoder(self.patch_embed(pixel_values, grid_thw), grid_thw)


# ---- §3.8 projector ------------------------------------------------------------------------------
class PatchMergerProjector(nn.Module):
    """``mm_projector`` (``patchmerger``): LayerNorm on each C-wide sub-vector of a merged token
    *before* concatenation, then ``Linear(4C, 4C) -> GELU (erf) -> Linear(4C, text_hidden)``
    (``proj.1`` is the GELU and has no weights)."""

    def __init__(self, config: VisionConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        width, kw = config.projector_hidden_size, dict(dtype=dtype, device=device)
        self.pre_norm = LayerNorm(config.mm_hidden_size, config.projector_ln_eps, **kw)
        self.proj = nn.Sequential(
            Linear(width, width, bias=True, **kw),
            nn.GELU(),
            Linear(width, config.text_hidden_size, bias=True, **kw),
        )

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        # merged: [N, kh·kw, C] -> [N, text_hidden]
        return self.proj(self.pre_norm(merged).flatten(1))


# ---- the whole vision path ---------------------------------------------------------------------
def normalize_grids(grid_thw: Sequence[Sequence[int]] | torch.Tensor) -> list[GridTHW]:
    """``[(t, h, w), ...]`` from a list of triples or an integer ``[N, 3]`` tensor."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
    grids = []
    for row in rows:
        values = tuple(row)
        if len(values) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
        ):
            raise ValueError(f"grid_thw entries must be three positive integers, got {row!r}")
        grids.append(values)
    return grids


class KimiVisionModel(nn.Module):
    """``vision_tower`` + ``mm_projector``: pixel patches -> LLM input embeddings.

    ``forward(pixel_values, grid_thw)``:
        pixel_values ``[L, 3, p, p]`` (any float dtype; cast to the model's), chunks concatenated
            in order, frame-major then row-major inside a chunk (spec §3);
        grid_thw ``[(t, h, w), ...]`` (or an ``[N, 3]`` tensor), ``L = Σ t·h·w``;
        returns one ``[h/2 · w/2, text_hidden]`` tensor per chunk, in the model dtype: the
            embeddings that replace that chunk's ``<|media_pad|>`` tokens, in order.
            ``torch.cat`` of the list is the rows of the whole batch in prompt order.

    Chunks never interact, so a chunk's embeddings do not depend on what it is batched with.
    """

    def __init__(
        self,
        config: VisionConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.vision_tower = MoonViT3d(config, dtype=dtype, device=device)
        self.mm_projector = PatchMergerProjector(config, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.mm_projector.pre_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector.pre_norm.weight.dtype

    def check_inputs(
        self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]] | torch.Tensor
    ) -> list[GridTHW]:
        c = self.config
        grids = normalize_grids(grid_thw)
        if not grids:
            raise ValueError("grid_thw is empty: nothing to encode")
        kh, kw = c.merge_kernel_size
        for t, h, w in grids:
            if t > c.init_pos_emb_time:
                raise ValueError(
                    f"a chunk of {t} frames exceeds init_pos_emb_time={c.init_pos_emb_time}"
                )
            if h % kh or w % kw:
                raise ValueError(f"grid {h}x{w} is not a multiple of the {kh}x{kw} merge kernel")
            if h > c.rope_max_height or w > c.rope_max_width:
                raise ValueError(
                    f"grid {h}x{w} exceeds the 2D RoPE table {c.rope_max_height}x{c.rope_max_width}"
                )
        total = sum(t * h * w for t, h, w in grids)
        expected = (total, 3, c.patch_size, c.patch_size)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}, grid_thw needs "
                f"{list(expected)}"
            )
        return grids

    @torch.inference_mode()
    def encode(
        self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]] | torch.Tensor
    ) -> torch.Tensor:
        """The tower alone: ``[L, C]`` patch features after the final LayerNorm."""
        grids = self.check_inputs(pixel_values, grid_thw)
        return self.vision_tower(pixel_values.to(self.device), grids)

    @torch.inference_mode()
    def forward(
        self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]] | torch.Tensor
    ) -> list[torch.Tensor]:
        grids = self.check_inputs(pixel_values, grid_thw)
        features = self.vision_tower(pixel_values.to(self.device), grids)
        merged = tpool_patch_merger(features, grids, self.config.merge_kernel_size)
        embeddings = self.mm_projector(torch.cat(merged))  # one GEMM for every chunk
        return list(embeddings.split([m.shape[0] for m in merged]))

    # ---- loading -------------------------------------------------------------------------------
    def weight_specs(self) -> dict[str, TensorSpec]:
        """Checkpoint tensor name -> what the model reads (its parameter names are Moonshot's)."""
        specs: dict[str, TensorSpec] = {}
        for name, param in self.named_parameters():

            def load(src: TensorSlice, param: nn.Parameter = param) -> None:
                param.copy_(src.read())

            specs[name] = TensorSpec(tuple(param.shape), FLOAT_DTYPES, load)
        return specs

    @torch.no_grad()
    def load_weights(self, reader: CheckpointReader) -> None:
        for name in reader.tensors:
            if name.startswith(VISION_WEIGHT_PREFIXES) and not name.endswith((".weight", ".bias")):
                raise CheckpointError(
                    f"tensor {name}: the vision tower and projector must be stored unquantized "
                    "(plain weight/bias)"
                )
        reader.load(self.weight_specs())

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        reader: CheckpointReader | None = None,
    ) -> KimiVisionModel:
        """Builds and loads the vision model of a K2.5/K2.6 checkpoint (its ``vision_tower.*`` /
        ``mm_projector.*`` tensors only). ``reader``: reuse an open reader of ``path``."""
        config = load_model_config(path).vision_config
        if config is None:
            raise CheckpointError(f"{path}: config.json has no vision_config (a text-only model)")
        model = cls(config, dtype=dtype, device=device)
        model.load_weights(reader or CheckpointReader(path))
        return model.eval()
