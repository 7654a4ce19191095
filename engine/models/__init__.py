"""Qwen2.5-VL-compatible vision-language model: config, loading, forward, tokenizer/processor, generation."""

from .config import ModelConfig, ModelConfigError, TextConfig, VisionConfig, load_model_config
from .generate import FocusRequest, Rollout, generate
from .loading import CheckpointError, from_pretrained, save_pretrained
from .model import VLModel
from .processor import ImageConfig, Processor, processor_from_pretrained, smart_resize
from .rope import mrope_position_ids
from .tiny import create_tiny_checkpoint, tiny_config
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "FocusRequest",
    "ImageConfig",
    "ModelConfig",
    "ModelConfigError",
    "Processor",
    "Rollout",
    "TextConfig",
    "Tokenizer",
    "VLModel",
    "VisionConfig",
    "create_tiny_checkpoint",
    "from_pretrained",
    "generate",
    "load_model_config",
    "mrope_position_ids",
    "processor_from_pretrained",
    "save_pretrained",
    "smart_resize",
    "tiny_config",
]
