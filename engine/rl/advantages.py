"""Group-relative advantages for GRPO.

For each prompt's group of G completions with rewards ``R_1..R_G``:
``A_i = (R_i − mean_G) / (std_G + eps)`` (GRPO), or ``A_i = R_i − mean_G`` with ``scale_by_std=False`` (Dr.GRPO,
which drops the std to avoid up-weighting near-uniform groups). ``std_G`` is the unbiased (Bessel-corrected)
standard deviation, as in TRL's GRPOTrainer that the release builds on; ``eps = 1e-4``. A group whose rewards are
all equal gets advantage 0 for every member. All G samples of a prompt live on the same rank, so no collective
is needed.
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """rewards float [P*G], prompt-major (prompt p's samples at ``p*G .. p*G+G-1``) -> advantages float32 [P*G]."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} values is not a multiple of group_size {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
