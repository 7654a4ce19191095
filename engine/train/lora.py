"""LoRA in plain PyTorch: low-rank adapters on selected nn.Linear modules, base weights frozen.

``y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros), so a fresh
adapter leaves the model's output unchanged. ``LoRALinear`` *is* an nn.Linear that keeps the original ``weight``
and ``bias`` Parameters under their original names and adds ``lora_A`` / ``lora_B`` beside them: checkpoints,
HF loading and FSDP wrapping see the model's own parameter names, plus ``<module>.lora_A`` / ``.lora_B``.

``lora_disabled(model)`` runs the base model (adapters off) — the frozen reference policy of GRPO, without a
second copy of the weights. ``merge_lora_state_dict`` folds adapters into a full state dict for export (works on
the gathered state dict of a sharded model); ``merge_and_unload`` does the same in place on an unsharded model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import zlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import LoRAConfig
from engine.distributed.parallel import vision_tower


class LoRALinear(nn.Linear):
    """nn.Linear plus a rank-``rank`` adapter. ``lora_enabled`` False: plain base output."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator | None = None
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return out
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return out + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(α/r) · B A`` [out, in] in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches the module's last name part exactly, or its full dotted name as a glob."""
    leaf = name.rsplit(".", 1)[-1]
    return any(p == leaf or fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Replace matching nn.Linear modules with LoRALinear, freeze everything but the adapters; returns their names.

    With ``cfg.freeze_vision`` the vision tower (``model.vision_tower`` / ``model.visual``) gets no adapters.
    Each ``lora_A`` is drawn from a generator seeded by (``seed``, module name), not the global RNG, so every
    rank builds identical adapters (FSDP2 shards whatever each rank holds) whatever it sampled before. On a
    meta-device model the adapters are left uninitialised: ``engine.train.sharded`` fills their shards after the
    load with the same draws (:func:`initial_lora_A`).
    Raises if no module matches, listing a few Linear names that exist.
    """
    tower = vision_tower(model) if cfg.freeze_vision else None
    skip = {id(m) for m in tower.modules()} if tower is not None else set()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and id(module) not in skip and _matches(name, cfg.target_modules)
    ]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(
            f"LoRA target_modules {list(cfg.target_modules)} match no nn.Linear; some Linear names: {linears}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gen = None if module.weight.is_meta else lora_generator(seed, name, module.weight.device)
        adapted = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, generator=gen)
        adapted.train(module.training)  # a new module starts in training mode: take the model's (eval → no dropout)
        setattr(parent, child, adapted)
    return [name for name, _ in targets]


def lora_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator ``lora_A`` of module ``name`` is drawn from (seeded by the run seed and the module name)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def initial_lora_A(module: LoRALinear, name: str, seed: int) -> torch.Tensor:
    """The fp32 [r, in] ``lora_A`` that :func:`apply_lora` draws on the CPU for module ``name`` (Kaiming-uniform from
    :func:`lora_generator`), whatever device or sharding the module has: sharded builds fill their shards from it."""
    a = torch.empty(module.rank, module.in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=lora_generator(seed, name))
    return a


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients into the vision tower (full fine-tuning with a frozen encoder); returns #params frozen."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    count = 0
    for param in tower.parameters():
        param.requires_grad_(False)
        count += param.numel()
    return count


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every adapter off (the base / reference policy); restores the previous flags."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.lora_enabled = flag


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """Module name -> α/r for every adapter (needed to merge a state dict)."""
    return {name: m.scaling for name, m in lora_modules(model)}


def merge_lora_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A new state dict with ``W + (α/r) B A`` folded into each ``<module>.weight`` and the adapter keys dropped."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, scaling in scalings.items():
        keys = (f"{name}.weight", f"{name}.lora_A", f"{name}.lora_B")
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"merge_lora_state_dict: state dict lacks {missing} for adapter {name!r}")
        weight, a, b = (state[k] for k in keys)
        merged[keys[0]] = (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)
    return merged


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back (unsharded models only)."""
    for name, module in lora_modules(model):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = module.weight
        linear.bias = module.bias
        linear.weight.add_(module.delta_weight().to(linear.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model
