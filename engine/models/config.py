"""Model configuration: dataclasses read from a Qwen2.5-VL ``config.json``.

Both layouts HF has written are accepted: the flat hub layout (text fields at the top level, ``rope_scaling``)
and the nested transformers-5 layout (``text_config``, ``rope_parameters``). Anything this engine does not
implement (sliding-window attention, non-M-RoPE scaling, other activations, other model types) is refused with
a :class:`ModelConfigError` naming the file and the field, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """A config.json this engine cannot run faithfully."""


@dataclass
class VisionConfig:
    """The ViT: patch embed (temporal patch 2) → blocks (window / full attention) → 2×2 patch merger."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    hidden_act: str = "silu"
    tokens_per_second: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * temporal_patch * patch * patch (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class TextConfig:
    """The Qwen2 decoder: GQA attention with q/k/v bias, RMSNorm, SwiGLU, M-RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    """A whole Qwen2.5-VL model; ``to_hf_dict`` writes it back in the flat hub layout."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str | None = None

    def validate(self, source: str = "config") -> None:
        """Check invariants the model code relies on; raise ModelConfigError naming the field."""
        t, v = self.text, self.vision
        checks = [
            (t.num_attention_heads % t.num_key_value_heads == 0, "num_attention_heads % num_key_value_heads"),
            (sum(t.mrope_section) * 2 == t.head_dim, f"mrope_section {t.mrope_section} must sum to head_dim/2"),
            (len(t.mrope_section) == 3, "mrope_section must have 3 entries (t, h, w)"),
            (v.hidden_size % v.num_heads == 0, "vision hidden_size % num_heads"),
            (v.head_dim % 4 == 0, "vision head_dim must be a multiple of 4 (2-D rotary)"),
            (v.out_hidden_size == t.hidden_size, "vision out_hidden_size must equal text hidden_size"),
            (v.window_size % (v.spatial_merge_size * v.patch_size) == 0, "vision window_size % (merge * patch)"),
            (all(0 <= i < v.depth for i in v.fullatt_block_indexes), "fullatt_block_indexes out of range"),
            (t.hidden_act == "silu", f"text hidden_act {t.hidden_act!r} (only 'silu')"),
            (v.hidden_act == "silu", f"vision hidden_act {v.hidden_act!r} (only 'silu')"),
            (
                max(self.image_token_id, self.vision_start_token_id, self.vision_end_token_id) < t.vocab_size,
                "special token ids must be < vocab_size",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise ModelConfigError(f"{source}: unsupported or inconsistent config: {what}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat hub layout that both transformers 4.x and 5.x read."""
        text = asdict(self.text)
        mrope = text.pop("mrope_section")
        text.pop("head_dim")
        vision = asdict(self.vision)
        vision["in_chans"] = vision["in_channels"]
        vision["spatial_patch_size"] = vision["patch_size"]
        vision["model_type"] = "qwen2_5_vl_vision"
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **text,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": mrope},
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "vision_config": vision,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype or "float32",
        }


def qwen2_5_vl_7b_config() -> ModelConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's shape, from its published config.json (no weights needed): decoder hidden
    3584, 28 layers, 28 heads / 4 KV heads (head_dim 128, M-RoPE sections 16/24/24, rope_theta 1e6), intermediate
    18944, vocabulary 152064, untied head; ViT depth 32, hidden 1280, intermediate 3420, 16 heads, patch 14,
    temporal patch 2, 2x2 merge, window 112, full attention in blocks 7/15/23/31, out_hidden 3584; bf16.
    8.29 B parameters (0.68 B of them the vision tower)."""
    text = TextConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        mrope_section=[16, 24, 24],
        max_position_embeddings=128000,
    )
    vision = VisionConfig(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    )
    return ModelConfig(text=text, vision=vision, tie_word_embeddings=False, torch_dtype="bfloat16")


_SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


def _pick(d: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    names = {f.name for f in cls.__dataclass_fields__.values()}
    return {k: d[k] for k in names if k in d and d[k] is not None}


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json (flat or nested layout)."""
    model_type = raw.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        supported = _SUPPORTED_MODEL_TYPES
        raise ModelConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")
    text_raw = dict(raw)
    text_raw.update(raw.get("text_config") or {})
    if text_raw.get("use_sliding_window"):
        raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ModelConfigError(f"{source}: rope type {rope_type!r} is not supported (only M-RoPE without scaling)")
    if "mrope_section" not in rope:
        raise ModelConfigError(f"{source}: rope_scaling/rope_parameters lacks mrope_section")
    text_kwargs = _pick(text_raw, TextConfig, source)
    text_kwargs["mrope_section"] = list(rope["mrope_section"])
    theta = rope.get("rope_theta", text_raw.get("rope_theta"))
    if theta is not None:
        text_kwargs["rope_theta"] = float(theta)
    text = TextConfig(**text_kwargs)

    vision_raw = dict(raw.get("vision_config") or {})
    if "in_chans" in vision_raw and "in_channels" not in vision_raw:
        vision_raw["in_channels"] = vision_raw["in_chans"]
    vrope = vision_raw.get("rope_parameters") or {}
    if "rope_theta" in vrope:
        vision_raw["rope_theta"] = vrope["rope_theta"]
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(vision_raw.get(key), (list, tuple)):
            raise ModelConfigError(f"{source}: vision_config.{key} as a list is not supported")
    vision = VisionConfig(**_pick(vision_raw, VisionConfig, source))
    vision.fullatt_block_indexes = list(vision.fullatt_block_indexes)

    top = _pick(raw, ModelConfig, source)
    top.pop("text", None)
    top.pop("vision", None)
    if "dtype" in raw and "torch_dtype" not in raw:
        top["torch_dtype"] = raw["dtype"]
    tie = raw.get("tie_word_embeddings", (raw.get("text_config") or {}).get("tie_word_embeddings", False))
    top["tie_word_embeddings"] = bool(tie)
    cfg = ModelConfig(text=text, vision=vision, **top)
    cfg.validate(source)
    return cfg


def load_model_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{file}: invalid JSON ({e})") from e
    return config_from_dict(raw, str(file))
