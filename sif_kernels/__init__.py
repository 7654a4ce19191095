"""Triton kernels for the RL path: token log-probs, fused-linear log-probs and the GRPO loss.

Each op dispatches CUDA tensors to Triton and CPU tensors to its PyTorch reference; pass backend="triton" to run
the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (tests) or backend="torch" to force the reference.
"""

from .grpo_loss import GRPOLossConfig, grpo_loss, grpo_loss_from_logits
from .linear_logprob import linear_token_logprobs
from .logprob import token_logprobs

__all__ = ["GRPOLossConfig", "grpo_loss", "grpo_loss_from_logits", "linear_token_logprobs", "token_logprobs"]
