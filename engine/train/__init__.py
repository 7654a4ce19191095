"""The training loop shared by SFT and GRPO: Trainer, objectives' output type, batch sources, checkpoints."""

from engine.train.batch_source import BatchSource, IndexedBatchSource, StepContext
from engine.train.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    ResumeError,
    checkpoint_problem,
    export_hf,
    full_state_dict,
)
from engine.train.lora import apply_lora, freeze_vision_tower, lora_disabled, merge_and_unload, merge_lora_state_dict
from engine.train.metrics import MetricsLog, PhaseTimer, mean_across_ranks, read_metrics
from engine.train.optim import build_optimizer, build_scheduler
from engine.train.plot import plot_curves
from engine.train.trainer import (
    NonFiniteError,
    Objective,
    ObjectiveOutput,
    Trainer,
    TrainResult,
    finished_export,
    seed_all,
)

__all__ = [
    "BatchSource",
    "CheckpointMismatch",
    "Checkpointer",
    "IndexedBatchSource",
    "MetricsLog",
    "NonFiniteError",
    "Objective",
    "ObjectiveOutput",
    "PhaseTimer",
    "ResumeError",
    "StepContext",
    "TrainResult",
    "Trainer",
    "apply_lora",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_problem",
    "export_hf",
    "finished_export",
    "freeze_vision_tower",
    "full_state_dict",
    "lora_disabled",
    "mean_across_ranks",
    "merge_and_unload",
    "merge_lora_state_dict",
    "plot_curves",
    "read_metrics",
    "seed_all",
]
