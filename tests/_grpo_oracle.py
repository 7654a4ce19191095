"""The GRPO loss oracle shared by the kernel tests: an independent fp64 re-statement of TRL's
GRPOTrainer._compute_loss, the loss types and hyper-parameter variants they sweep, and the config of each case."""

import torch

from sif_kernels import GRPOLossConfig

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
VARIANTS = {  # name -> (delta, beta, with_old)
    "clip+kl": (None, 0.04, True),
    "delta": (1.4, 0.0, True),
    "delta+kl": (1.25, 0.1, True),
    "on_policy": (None, 0.04, False),
}


def trl_compute_loss(lp, old, ref, advantages, completion_mask, cfg, num_items_in_batch=None):
    """TRL GRPOTrainer._compute_loss (trl 0.24; single process, no gradient accumulation) in fp64, plus the
    optional log-ratio clamp of GRPOLossConfig (None reproduces TRL verbatim)."""
    completion_mask = completion_mask.double()
    old = lp.detach() if old is None else old.double()
    log_ratio = lp - old
    if cfg.importance_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    if cfg.log_ratio_clamp is not None:
        log_importance_weights = log_importance_weights.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - cfg.eps_low, 1 + cfg.eps_high)
    if cfg.delta is not None:
        coef_1 = torch.clamp(coef_1, max=cfg.delta)
    advantages = advantages.double()
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if cfg.beta != 0.0:
        ref = ref.double()
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token_loss = per_token_loss + cfg.beta * per_token_kl
    if cfg.loss_type == "grpo":
        loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * cfg.max_completion_length)
    else:
        loss = (per_token_loss * completion_mask).sum() / num_items_in_batch
    completion_token_count = completion_mask.sum().clamp(min=1.0)

    def masked_batch_mean(x, per_sequence=False):
        # TRL tests x.shape[1] == 1 to spot per-sequence tensors, which misfires for batches of one-token
        # completions; the kernels (and this re-statement) use the importance level instead.
        return x.mean() if per_sequence else (x * completion_mask).sum() / completion_token_count

    per_sequence = cfg.importance_level == "sequence"
    is_low = (coef_1 < 1 - cfg.eps_low) & (advantages.unsqueeze(1) < 0)
    is_high = (coef_1 > 1 + cfg.eps_high) & (advantages.unsqueeze(1) > 0)
    metrics = {
        "clip_low": masked_batch_mean(is_low.double(), per_sequence),
        "clip_high": masked_batch_mean(is_high.double(), per_sequence),
        "clip_fraction": masked_batch_mean((is_low | is_high).double(), per_sequence),
    }
    if cfg.beta != 0.0:
        metrics["kl"] = masked_batch_mean(per_token_kl).detach()
    return loss, metrics


def cfg_for(loss_type, level, variant, **extra):
    delta, beta, _ = VARIANTS[variant]
    return GRPOLossConfig(
        beta=beta,
        eps_low=0.2,
        eps_high=0.28,
        delta=delta,
        importance_level=level,
        loss_type=loss_type,
        max_completion_length=12,
        **extra,
    )
