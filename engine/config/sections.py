"""The sections every job shares: which checkpoint (``model``), which records (``data``), LoRA, the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelSection:
    """Which checkpoint to load. ``path`` empty: the tiny embedded default (created on first use).

    ``dtype``: storage of the loaded weights. Trainable parameters are always fp32 masters (FSDP2 computes in bf16
    on CUDA, see engine.distributed.parallel); ``bfloat16`` keeps a frozen LoRA base in bf16 (half the memory).

    ``align_steps``, ``align_scenes``: when the tiny default is created, its random vision tower is first aligned
    to the decoder's word embeddings (``engine.train.vision_align``) for ``align_steps`` batches on
    ``align_scenes`` generated scenes (rendered once under the output folder's ``data/``); 0 steps leaves it
    random. ``align_position_weight`` > 0 also teaches each image token where it is (that weight times
    ``engine.train.vision_align.position_code`` of its cell, added to its target). ``align_lr`` is the alignment's
    learning rate; ``align_balanced`` weighs the tokens that show an object as much as the background ones.
    Ignored with a ``path``.
    """

    path: str = ""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    align_steps: int = 300
    align_scenes: int = 600
    align_position_weight: float = 0.0
    align_lr: float = 1e-3
    align_balanced: bool = False


@dataclass
class DataConfig:
    """Where the records come from and how sequences are shaped. ``path`` empty: the bundled synthetic set.

    with_depth: SFT prompts show the colour-mapped depth image after the RGB one. None: as the rollouts and the
    evaluation of the same focusing mode show it (crop: yes, text: no), so that SFT trains on the prompts the
    policy is later sampled and judged on.
    """

    path: str = ""
    eval_path: str = ""
    max_seq_len: int = 2048
    max_pixels: int = 448 * 448
    min_pixels: int = 56 * 56
    with_depth: bool | None = None
    shuffle: bool = True
    limit: int = 0  # 0 = all records
    max_skip_share: float = 0.1  # stop once more than this share of the records is skipped (at load or decode)


@dataclass
class LoRAConfig:
    """Low-rank adapters on nn.Linear modules selected by name patterns (see engine.train.lora)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    freeze_vision: bool = True


@dataclass
class TrainConfig:
    """The optimisation loop: schedule, batch shape, clipping, checkpoints, logging."""

    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_steps: int = 0  # 0: epochs x steps per epoch
    epochs: int = 1
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    checkpoint_frozen: bool = False  # also save frozen parameters (a LoRA base); off: they come from model.path
    resume: bool = False
    resume_accept: tuple[str, ...] = ()  # keys / sections whose changes a resume accepts as given (docs/robustness.md)
    export_hf: bool = True
    export_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    export_max_shard_mb: int = 4096  # HF export: model-0000i-of-0000N.safetensors files of at most this size
    dp_replicate: int = 1  # 1: FSDP over all ranks; R > 1: HSDP, R replicas x (world / R) shards; 0: one per node
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    max_consecutive_nonfinite: int = 5
    log_every: int = 1
    progress_bar: bool = True
    plot: bool = True
    tensorboard: Literal["auto", "on", "off"] = "auto"  # events in <run>/tb/: auto = when tensorboard is installed
