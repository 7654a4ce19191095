"""Process group, device mesh and FSDP2 wrapping (DCP checkpoints live in engine.train.checkpoint)."""

from engine.distributed.env import DistEnv, all_reduce_max, all_reduce_sum, broadcast_object, init_distributed
from engine.distributed.parallel import (
    decoder_blocks,
    default_param_dtype,
    fsdp_modules,
    lazy_init,
    parallelize,
    unsharded,
    vision_blocks,
    vision_tower,
)

__all__ = [
    "DistEnv",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_object",
    "decoder_blocks",
    "default_param_dtype",
    "fsdp_modules",
    "init_distributed",
    "lazy_init",
    "parallelize",
    "unsharded",
    "vision_blocks",
    "vision_tower",
]
