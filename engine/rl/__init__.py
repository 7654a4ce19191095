"""GRPO-SIF: rewards, advantages, the crop-mode focus hook, rollouts and the packed GRPO objective.

Modules (imported on use): ``rewards`` (format / answer / grounding / depth, each its own function) with ``iou``
(exact box-set overlap), ``advantages`` (group-relative), ``prompts`` (records -> SIF prompts), ``focus`` (the crop
hook), ``rollout`` (G samples per prompt, text or crop mode), ``packing`` (packed sequences -> target log-probs
from hidden states), ``grpo`` (RLConfig and the objective), ``source`` (the Trainer's per-step GRPO batches).
"""
