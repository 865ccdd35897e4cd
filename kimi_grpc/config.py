"""Model configuration parsed from a checkpoint's ``config.json`` (every Kimi K2.x variant).

Two layouts exist (see shared/docs/kimi-spec.md §1):

* flat ``DeepseekV3ForCausalLM`` / ``model_type: kimi_k2`` (K2-Instruct, K2-Thinking): the text
  model's fields sit at the top level and tensors are named ``model.layers.N...``;
* nested ``KimiK25ForConditionalGeneration`` (K2.5, K2.6): the text model lives under
  ``text_config`` and its tensors are prefixed ``language_model.``; the MoonViT-3D vision tower
  and its projector are described by ``vision_config`` (+ the top-level
  ``media_placeholder_token_id`` / ``video_placeholder``), parsed into :class:`VisionConfig`
  (shared/docs/kimi-vision-spec.md §1.1). Text-only checkpoints have no vision part.

The file is data only: ``auto_map`` entries (remote code) are never imported or executed.
Every unknown or inconsistent value raises :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_grpc import envs

TEXT_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
NESTED_ARCHITECTURES = ("KimiK25ForConditionalGeneration",)
TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
NESTED_MODEL_TYPES = ("kimi_k25",)
NESTED_WEIGHT_PREFIX = "language_model."


class ConfigError(ValueError):
    """A checkpoint configuration that kimi-grpc cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DeepSeek-V3 flavour). ``factor == 1`` means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class Int4QuantConfig:
    """compressed-tensors ``pack-quantized`` W4A16: symmetric INT4, groups along the input dim."""

    group_size: int = 32
    num_bits: int = 4
    # compressed-tensors target names and ``re:`` regexes for modules kept unquantized.
    ignore: tuple[str, ...] = ()

    def is_quantized(self, module_name: str) -> bool:
        """Whether the Linear ``module_name`` (without ``language_model.``) is stored packed."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module_name):
                    return False
            elif module_name == pattern or module_name.endswith("." + pattern):
                return False
        return True


@dataclass(frozen=True)
class ModelConfig:
    """The text model of a Kimi K2.x / DeepSeek-V3 checkpoint (field names follow config.json),
    plus the vision tower's :class:`VisionConfig` for K2.5/K2.6 checkpoints that have one."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quantization: Int4QuantConfig | None = None
    # "" for flat checkpoints, "language_model." for the nested K2.5/K2.6 layout.
    weight_prefix: str = ""
    architecture: str = "DeepseekV3ForCausalLM"
    model_type: str = "kimi_k2"
    # The vision tower + projector (nested K2.5/K2.6 configs with ``vision_config``); None for
    # text-only checkpoints.
    vision_config: VisionConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "n_group",
            "topk_group",
            "moe_layer_freq",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be null or positive, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} is outside "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            raise ConfigError("n_routed_experts and n_shared_experts must be >= 0")
        if self.n_routed_experts:
            self._check_router()
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        for token_id in (*self.eos_token_ids, self.bos_token_id, self.pad_token_id):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"token id {token_id} is outside vocab_size={self.vocab_size}")
        if self.quantization is not None:
            group = self.quantization.group_size
            for name in ("hidden_size", "moe_intermediate_size"):
                if getattr(self, name) % group:
                    raise ConfigError(
                        f"{name}={getattr(self, name)} is not a multiple of the INT4 "
                        f"group_size={group}"
                    )

    def _check_router(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, n_routed_experts={self.n_routed_experts}]"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(
                "group-limited routing needs >= 2 experts per group (top-2 group score)"
            )
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                f"{self.topk_group} selected groups x {per_group} experts"
            )

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one token's MLA latent cache entry: compressed kv + rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5`` times the YaRN ``mscale(factor, mscale_all_dim)^2`` correction."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope_scaling
        if rope is not None and rope.mscale_all_dim and rope.factor > 1:
            mscale = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


# ---- vision (MoonViT-3D + patch-merger projector) ----------------------------------------------
DEFAULT_MEDIA_PLACEHOLDER_TOKEN_ID = 163605  # <|media_pad|> in Kimi's vocabulary
DEFAULT_VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"
# config.json values this implementation computes; anything else is refused (spec §1.1).
SUPPORTED_VISION_VALUES: dict[str, tuple[Any, ...]] = {
    "pos_emb_type": ("divided_fixed",),
    "video_attn_type": ("spatial_temporal",),
    "merge_type": ("sd2_tpool",),
    "mm_projector_type": ("patchmerger",),
    "projector_hidden_act": ("gelu",),
    # Hard-coded in Moonshot's remote code; vLLM reads them with these getattr defaults.
    "activation_func": ("gelu_pytorch_tanh",),
    "norm_type": ("layernorm",),
    "pos_emb_interpolation_mode": ("bicubic",),
    "attn_bias": (True,),
    "hidden_act": ("gelu_pytorch_tanh",),
    # Which attention kernel the remote code picks; informational: we always compute its
    # flash_attention_2 semantics (block-diagonal per chunk). (Its "eager" path adds the boolean
    # block mask as +1 to the logits instead of masking other chunks out.)
    "_attn_implementation": (None, "flash_attention_2", "sdpa", "eager"),
}


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (MoonViT-3D) and projector of a K2.5/K2.6 checkpoint.

    Field names follow ``config.json`` (``vision_config.*``; the placeholder fields sit at the top
    level there). The ``rope_*`` / ``layer_norm_eps`` / ``attn_bias`` / ``hidden_act`` fields are
    constants of Moonshot's remote code that config.json does not carry (spec §1.1 "Not in
    config"); they are fields only so the model reads them from one place.
    """

    vt_hidden_size: int = 1152
    vt_intermediate_size: int = 4304
    vt_num_attention_heads: int = 16
    vt_num_hidden_layers: int = 27
    patch_size: int = 14
    init_pos_emb_height: int = 64  # learned 2D position table (H, W, C)
    init_pos_emb_width: int = 64
    init_pos_emb_time: int = 4  # fixed sin/cos rows: frames per video chunk at most
    merge_kernel_size: tuple[int, int] = (2, 2)
    mm_hidden_size: int = 1152  # projector pre-norm width (= vt_hidden_size)
    text_hidden_size: int = 7168  # projector output (= the text model's hidden_size)
    projector_ln_eps: float = 1e-5
    media_placeholder_token_id: int = DEFAULT_MEDIA_PLACEHOLDER_TOKEN_ID
    video_placeholder: str = DEFAULT_VIDEO_PLACEHOLDER
    use_unified_vision_chunk: bool = True
    pos_emb_type: str = "divided_fixed"
    video_attn_type: str = "spatial_temporal"
    merge_type: str = "sd2_tpool"
    mm_projector_type: str = "patchmerger"
    projector_hidden_act: str = "gelu"  # exact (erf) GELU
    # Hard-coded in Moonshot's modeling_kimi_k25.py:
    hidden_act: str = "gelu_pytorch_tanh"  # encoder MLP
    attn_bias: bool = True  # wqkv / wo carry biases
    layer_norm_eps: float = 1e-5  # every ViT LayerNorm (nn.LayerNorm default)
    rope_theta: float = 10000.0  # 2D RoPE base
    rope_max_height: int = 512  # 2D RoPE table bound: grids beyond it are refused
    rope_max_width: int = 512

    def __post_init__(self) -> None:
        positive = (
            "vt_hidden_size",
            "vt_intermediate_size",
            "vt_num_attention_heads",
            "vt_num_hidden_layers",
            "patch_size",
            "init_pos_emb_height",
            "init_pos_emb_width",
            "init_pos_emb_time",
            "mm_hidden_size",
            "text_hidden_size",
            "rope_max_height",
            "rope_max_width",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"vision_config.{name} must be a positive integer, got {value!r}")
        kernel = self.merge_kernel_size
        if (
            not isinstance(kernel, tuple)
            or len(kernel) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in kernel)
        ):
            raise ConfigError(
                f"vision_config.merge_kernel_size must be two positive integers, got {kernel!r}"
            )
        if self.vt_hidden_size % self.vt_num_attention_heads:
            raise ConfigError(
                f"vision_config.vt_hidden_size={self.vt_hidden_size} is not divisible by "
                f"vt_num_attention_heads={self.vt_num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"vision_config: head_dim {self.head_dim} (vt_hidden_size / "
                "vt_num_attention_heads) must be divisible by 4 for the 2D RoPE"
            )
        if self.vt_hidden_size % 2:
            raise ConfigError(
                f"vision_config.vt_hidden_size={self.vt_hidden_size} must be even (sin/cos halves)"
            )
        if self.mm_hidden_size != self.vt_hidden_size:
            raise ConfigError(
                f"vision_config.mm_hidden_size={self.mm_hidden_size} must equal "
                f"vt_hidden_size={self.vt_hidden_size} (the projector normalises ViT outputs)"
            )
        for name, value in (
            ("projector_ln_eps", self.projector_ln_eps),
            ("layer_norm_eps", self.layer_norm_eps),
            ("rope_theta", self.rope_theta),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"vision_config.{name} must be > 0, got {value!r}")
        for name, allowed in SUPPORTED_VISION_VALUES.items():
            if hasattr(self, name) and getattr(self, name) not in allowed:
                raise ConfigError(
                    f"vision_config.{name} {getattr(self, name)!r} is not supported "
                    f"(expected {' or '.join(repr(a) for a in allowed)})"
                )
        if not isinstance(self.video_placeholder, str) or not self.video_placeholder:
            raise ConfigError(
                f"video_placeholder must be a non-empty string, got {self.video_placeholder!r}"
            )
        if not isinstance(self.use_unified_vision_chunk, bool):
            raise ConfigError(
                "use_unified_vision_chunk must be true or false, got "
                f"{self.use_unified_vision_chunk!r}"
            )
        token = self.media_placeholder_token_id
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ConfigError(f"media_placeholder_token_id must be a token id, got {token!r}")

    @property
    def head_dim(self) -> int:
        return self.vt_hidden_size // self.vt_num_attention_heads

    @property
    def merge_size(self) -> int:
        """ViT patches per merged token (4 for the 2x2 merge)."""
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @property
    def projector_hidden_size(self) -> int:
        """Width of one merged token before the projector: ``mm_hidden_size * kh * kw``."""
        return self.mm_hidden_size * self.merge_size

    def num_merged_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        """LLM tokens of one image or video chunk of ``grid_thw`` patches (``t`` is pooled)."""
        _, h, w = grid_thw
        return (h // self.merge_kernel_size[0]) * (w // self.merge_kernel_size[1])


# Keys of ``vision_config`` that map onto VisionConfig fields (the rest is ignored, like the
# text model's unused keys): validated by VisionConfig itself.
_VISION_KEYS = (
    "vt_hidden_size",
    "vt_intermediate_size",
    "vt_num_attention_heads",
    "vt_num_hidden_layers",
    "patch_size",
    "init_pos_emb_height",
    "init_pos_emb_width",
    "init_pos_emb_time",
    "mm_hidden_size",
    "text_hidden_size",
    "projector_ln_eps",
    "pos_emb_type",
    "video_attn_type",
    "merge_type",
    "mm_projector_type",
    "projector_hidden_act",
)


def _parse_vision(raw: dict[str, Any], text_hidden_size: int, vocab_size: int) -> VisionConfig:
    vision = raw["vision_config"]
    if not isinstance(vision, dict):
        raise ConfigError("vision_config must be an object")
    kwargs: dict[str, Any] = {k: vision[k] for k in _VISION_KEYS if k in vision}
    if kwargs.get("mm_hidden_size") is None:  # null in the remote config means "= vt width"
        kwargs["mm_hidden_size"] = kwargs.get("vt_hidden_size", VisionConfig.vt_hidden_size)
    kwargs.setdefault("text_hidden_size", text_hidden_size)
    if "projector_ln_eps" in kwargs and isinstance(kwargs["projector_ln_eps"], int | float):
        kwargs["projector_ln_eps"] = float(kwargs["projector_ln_eps"])
    if "merge_kernel_size" in vision:
        kernel = vision["merge_kernel_size"]
        if isinstance(kernel, int) and not isinstance(kernel, bool):
            kernel = [kernel, kernel]
        if not isinstance(kernel, list | tuple):
            raise ConfigError(
                f"vision_config.merge_kernel_size must be two positive integers, got {kernel!r}"
            )
        kwargs["merge_kernel_size"] = tuple(kernel)
    # Constants vLLM reads with getattr defaults: when present they must hold those values.
    for key in (
        "activation_func",
        "norm_type",
        "pos_emb_interpolation_mode",
        "attn_bias",
        "_attn_implementation",
    ):
        if key in vision and vision[key] not in SUPPORTED_VISION_VALUES[key]:
            raise ConfigError(
                f"vision_config.{key} {vision[key]!r} is not supported (expected "
                f"{' or '.join(repr(a) for a in SUPPORTED_VISION_VALUES[key])})"
            )
    # The placeholder fields live at the top level of config.json (some dumps repeat them in
    # vision_config; the top level wins).
    for key in ("media_placeholder_token_id", "video_placeholder", "use_unified_vision_chunk"):
        if key in raw:
            kwargs[key] = raw[key]
        elif key in vision:
            kwargs[key] = vision[key]
    config = VisionConfig(**kwargs)
    if config.text_hidden_size != text_hidden_size:
        raise ConfigError(
            f"vision_config.text_hidden_size={config.text_hidden_size} must equal "
            f"text_config.hidden_size={text_hidden_size} (the projector feeds the text model)"
        )
    if config.media_placeholder_token_id >= vocab_size:
        raise ConfigError(
            f"media_placeholder_token_id={config.media_placeholder_token_id} is outside "
            f"vocab_size={vocab_size}"
        )
    return config


# ---- parsing ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _as_id_list(value: Any, field_name: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(
                f"{field_name} must be an integer or a list of integers, got {value!r}"
            )
    return list(values)


def _parse_rope(text: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads ``rope_scaling`` (raw HF files) or ``rope_parameters`` (transformers 5 spelling)."""
    params = text.get("rope_scaling") or text.get("rope_parameters")
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    theta = text.get("rope_theta", (params or {}).get("rope_theta", 10000.0))
    if not params:
        return float(theta), None
    if not isinstance(params, dict):
        raise ConfigError(f"{key} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(
            f"{key}.type {rope_type!r} is not supported (expected 'yarn' or 'default')"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=float(params.get("mscale") or 1.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        )
    except KeyError as exc:
        raise ConfigError(f"{key} is missing {exc.args[0]!r}") from None
    if scaling.factor < 1:
        raise ConfigError(f"{key}.factor must be >= 1, got {scaling.factor}")
    if scaling.beta_fast < scaling.beta_slow:
        raise ConfigError(f"{key}.beta_fast must be >= beta_slow")
    return float(theta), scaling


def _parse_quantization(raw: dict[str, Any] | None) -> Int4QuantConfig | None:
    if not raw:
        return None
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise ConfigError(
            f"quantization_config.quant_method {method!r} is not supported "
            "(kimi-grpc loads compressed-tensors INT4 and unquantized checkpoints)"
        )
    fmt = raw.get("format")
    if fmt != "pack-quantized":
        raise ConfigError(f"quantization_config.format {fmt!r} is not supported (pack-quantized)")
    groups = raw.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError("quantization_config.config_groups must hold exactly one group")
    ((group_name, group),) = groups.items()
    where = f"quantization_config.config_groups.{group_name}"
    if group.get("targets") != ["Linear"]:
        raise ConfigError(f"{where}.targets must be ['Linear'], got {group.get('targets')!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise ConfigError(f"{where}: activation quantization is not supported (W4A16 only)")
    weights = group.get("weights") or {}
    expected = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for key, value in expected.items():
        if weights.get(key) != value:
            raise ConfigError(f"{where}.weights.{key} must be {value!r}, got {weights.get(key)!r}")
    if weights.get("actorder") not in (None, False):
        raise ConfigError(f"{where}.weights.actorder must be null, got {weights.get('actorder')!r}")
    if weights.get("dynamic"):
        raise ConfigError(f"{where}.weights.dynamic must be false")
    group_size = weights.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ConfigError(f"{where}.weights.group_size must be a positive multiple of 8")
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise ConfigError("quantization_config.ignore must be a list of strings")
    for pattern in ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"quantization_config.ignore {pattern!r}: {exc}") from None
    return Int4QuantConfig(group_size=group_size, ignore=tuple(ignore))


def parse_model_config(
    raw: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelConfig:
    """Builds a :class:`ModelConfig` from parsed ``config.json`` (+ ``generation_config.json``)."""
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else None
    nested = "text_config" in raw
    if nested:
        if arch:
            known = arch in NESTED_ARCHITECTURES
        else:
            known = raw.get("model_type") in NESTED_MODEL_TYPES
        if not known:
            raise ConfigError(
                f"architectures {architectures!r} / model_type {raw.get('model_type')!r}: "
                f"expected one of {NESTED_ARCHITECTURES} for a config with text_config"
            )
        text = raw["text_config"]
        if not isinstance(text, dict):
            raise ConfigError("text_config must be an object")
        text_arch = (text.get("architectures") or ["DeepseekV3ForCausalLM"])[0]
        if text_arch not in TEXT_ARCHITECTURES:
            raise ConfigError(f"text_config.architectures {text_arch!r} is not supported")
        model_type = text.get("model_type", "kimi_k2")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"text_config.model_type {model_type!r} is not supported")
    else:
        if arch not in TEXT_ARCHITECTURES:
            raise ConfigError(
                f"architectures {architectures!r} is not supported; expected one of "
                f"{TEXT_ARCHITECTURES + NESTED_ARCHITECTURES}"
            )
        text = raw
        model_type = raw.get("model_type", "kimi_k2")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported")

    if text.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"scoring_func {text.get('scoring_func')!r} is not supported (sigmoid)")
    if text.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"topk_method {text.get('topk_method')!r} is not supported (noaux_tc)")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {text.get('hidden_act')!r} is not supported (silu)")
    if text.get("attention_bias", False):
        raise ConfigError("attention_bias=true is not supported (no Kimi checkpoint uses it)")
    if text.get("num_key_value_heads", text.get("num_attention_heads")) != text.get(
        "num_attention_heads"
    ):
        raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA")

    quant_raw = text.get("quantization_config") or raw.get("quantization_config")
    theta, rope_scaling = _parse_rope(text)
    eos: list[int] = []
    for source, name in (
        (raw, "eos_token_id"),
        (text, "text_config.eos_token_id"),
        (generation_config or {}, "generation_config.eos_token_id"),
    ):
        for token in _as_id_list(source.get("eos_token_id"), name):
            if token not in eos:
                eos.append(token)

    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    )
    for name in required:
        if name not in text:
            raise ConfigError(f"config is missing required field {name!r}")
    if "vision_config" in raw and not nested:
        raise ConfigError(
            "vision_config needs the nested KimiK25ForConditionalGeneration layout (text_config)"
        )
    try:
        vision = (
            _parse_vision(raw, text["hidden_size"], text["vocab_size"])
            if raw.get("vision_config") is not None
            else None
        )
        return ModelConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            moe_intermediate_size=text.get("moe_intermediate_size", text["intermediate_size"]),
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            n_routed_experts=text.get("n_routed_experts") or 0,
            n_shared_experts=text.get("n_shared_experts") or 0,
            num_experts_per_tok=text.get("num_experts_per_tok") or 0,
            kv_lora_rank=text["kv_lora_rank"],
            qk_nope_head_dim=text["qk_nope_head_dim"],
            qk_rope_head_dim=text["qk_rope_head_dim"],
            v_head_dim=text["v_head_dim"],
            q_lora_rank=text.get("q_lora_rank"),
            first_k_dense_replace=text.get("first_k_dense_replace", 0),
            moe_layer_freq=text.get("moe_layer_freq", 1),
            n_group=text.get("n_group") or 1,
            topk_group=text.get("topk_group") or 1,
            norm_topk_prob=bool(text.get("norm_topk_prob", True)),
            routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=text.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            bos_token_id=text.get("bos_token_id", raw.get("bos_token_id")),
            eos_token_ids=tuple(eos),
            pad_token_id=text.get("pad_token_id", raw.get("pad_token_id")),
            quantization=_parse_quantization(quant_raw),
            weight_prefix=NESTED_WEIGHT_PREFIX if nested else "",
            architecture=arch or "DeepseekV3ForCausalLM",
            model_type=raw.get("model_type", model_type),
            vision_config=vision,
            extra={"auto_map_ignored": bool(raw.get("auto_map") or text.get("auto_map"))},
        )
    except TypeError as exc:  # e.g. a string where a number belongs
        raise ConfigError(f"config has a value of the wrong type: {exc}") from None


def load_model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Reads ``config.json`` (+ ``generation_config.json`` when present) from a checkpoint."""
    directory = Path(checkpoint_dir)
    raw = _read_json(directory / "config.json")
    generation_path = directory / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.exists() else None
    return parse_model_config(raw, generation)


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine uses the model: batching limits and the KV cache budget."""

    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 8192  # tokens computed per step (prefill chunks + decodes)
    # One sequence's tokens per step while others compete for the step (a long prompt must not
    # starve decodes and admissions); alone it takes the whole budget. None: the budget's half.
    max_prefill_chunk_tokens: int | None = None
    max_waiting: int = 4096  # sequences queued before requests are refused as overload
    max_model_len: int | None = None  # context limit; default: the model's max_position_embeddings
    page_size: int = 64
    kv_cache_memory: int | None = None  # bytes for the latent cache (all layers)
    kv_cache_memory_fraction: float = 0.9  # CUDA without kv_cache_memory: share of free memory
    enable_prefix_caching: bool = True
    seed: int = 0  # the shared generator of requests without their own seed
    guided_decoding: bool = True  # load the grammar engine (tool calls / JSON by construction)
    # Vision embeddings kept for reuse (images / video chunks; checkpoints with a vision tower),
    # in tokens: 16,384 x 7,168 bf16 = 224 MiB on K2.6; holds ~4 of the largest images.
    encoder_cache_tokens: int = 16_384
    # Host-memory tier of the prefix cache, in bytes (0: off). Evicted device pages are kept
    # there and loaded back on a hit instead of recomputed (docs/ARCHITECTURE.md).
    host_kv_cache_memory: int = 0
    # How long a session that ended a step in tool calls keeps its pages in the host tier.
    kv_retention_seconds: float = 180.0
    # Run forwards and sampling on a device thread one step behind the host, so scheduling,
    # batch preparation and output processing happen during the forward (LLMEngine.step).
    # Default: KIMI_GRPC_OVERLAP_SCHEDULING (on).
    overlap_scheduling: bool = field(default_factory=lambda: envs.OVERLAP_SCHEDULING.get() == "1")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        chunk = self.max_prefill_chunk_tokens
        if chunk is not None and (
            not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1
        ):
            raise ConfigError(f"max_prefill_chunk_tokens must be a positive integer, got {chunk!r}")
        for name in ("encoder_cache_tokens", "host_kv_cache_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        retention = self.kv_retention_seconds
        if not 0 <= retention < float("inf"):
            raise ConfigError(f"kv_retention_seconds must be finite and >= 0, got {retention!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError(
                f"kv_cache_memory must be a positive byte count, got {self.kv_cache_memory}"
            )
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )

    @property
    def prefill_chunk_cap(self) -> int:
        """``max_prefill_chunk_tokens`` resolved: half the step budget (at least 1) by default,
        which leaves the other half to decodes and new admissions under contention."""
        if self.max_prefill_chunk_tokens is not None:
            return self.max_prefill_chunk_tokens
        return max(1, self.max_num_batched_tokens // 2)
