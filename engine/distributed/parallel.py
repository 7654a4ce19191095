"""FSDP2 wrapping in the spirit of torchtitan: one shard group per decoder block, per vision block, the vision
tower, and the root.

A model opts in through a small protocol:

* ``model.decoder_blocks() -> Sequence[nn.Module]`` — the transformer blocks of the language model, in order;
* ``model.vision_tower`` — the vision encoder module (attribute; absent or None for text-only models), whose
  ``blocks`` ModuleList, if any, holds its transformer blocks.

Models without ``decoder_blocks()`` fall back to the first of ``model.layers``, ``model.model.layers``,
``model.language_model.layers``, ``model.model.language_model.layers``; ``visual`` is accepted for the vision tower
(engine.models.VLModel: ``model.layers`` and ``visual.blocks``).

Each block becomes one FSDP2 unit (all-gathered just before its forward, resharded after it, its gradients
reduce-scattered as soon as its backward finishes), so peak memory holds one block's full parameters plus the
shards. The last decoder block and the root (embeddings, final norm, LM head) keep their parameters after forward:
backward needs them first, and the GRPO / SFT losses multiply hidden states by ``model.lm_head_weight`` *after* the
forward, so it is the gathered parameter there and its gradient reaches the shard through the root's post-backward.
FSDP2's lazy initialisation runs in ``parallelize`` itself, so any unit may run first (generation calls the vision
tower and the decoder blocks directly) without a warm-up forward through the root.
Mixed precision: parameters live (sharded) in fp32 as the optimiser's master copy; on CUDA they are all-gathered in
bf16 and gradients reduce-scattered in fp32; on CPU everything stays fp32. Activation checkpointing (optional)
recomputes each block in backward instead of storing its activations; it uses the composable ``checkpoint`` so that
parameter names (FQNs) do not change — checkpoints and HF export see the model's own names. The model's own
``set_gradient_checkpointing`` is switched off then, so nothing is recomputed twice.

Every forward must enter through ``model.__call__`` (engine.models' ``forward_packed`` and ``logits`` do), so that
FSDP2's hooks gather the root's parameters; a model method that bypasses it needs
``torch.distributed.fsdp.register_fsdp_forward_method``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

_FALLBACK_BLOCK_PATHS = ("layers", "model.layers", "language_model.layers", "model.language_model.layers")
_RESHARD_ATTR = "_sif_reshard_after_forward"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of ``model`` (protocol method, else a known attribute path); raises if none found."""
    if hasattr(model, "decoder_blocks"):
        blocks = list(model.decoder_blocks())
    else:
        blocks = []
        for path in _FALLBACK_BLOCK_PATHS:
            node: object = model
            for part in path.split("."):
                node = getattr(node, part, None)
            if isinstance(node, (nn.ModuleList, nn.Sequential)):
                blocks = list(node)
                break
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} exposes no decoder blocks: define decoder_blocks() or one of "
            f"{', '.join(_FALLBACK_BLOCK_PATHS)}"
        )
    return blocks


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of ``model`` (``vision_tower`` or ``visual`` attribute), or None."""
    for name in ("vision_tower", "visual"):
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module):
            return tower
    return None


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    """The vision tower's transformer blocks (``vision_tower.blocks``), or [] if it has none."""
    tower = vision_tower(model)
    blocks = getattr(tower, "blocks", None) if tower is not None else None
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def default_param_dtype(device_type: str) -> torch.dtype:
    """bf16 all-gathers on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare numerics)."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh``; returns it (now also an ``FSDPModule``).

    ``mesh``: 1-D (``("dp",)``, FSDP over every rank) or 2-D (``("dp_replicate", "dp_shard")``, HSDP: parameters
    sharded within a group, e.g. a node, and replicated across groups; see ``DistEnv.data_parallel_mesh``).
    Trainable parameters must be fp32 (the optimiser's master copy); frozen ones (a LoRA base) may be bf16.
    FSDP2 moves the parameters to the mesh's device. Call after LoRA injection / freezing, before building the
    optimiser. With real parameters the lazy initialisation runs here; afterwards load weights in place (DCP
    does), never by swapping parameter objects. A model built on the meta device is sharded without memory:
    then ``to_empty(device=...)``, fill the shards (``engine.models.loading.load_weights_sharded``) and call
    :func:`lazy_init` (``engine.train.sharded.build_sharded_model`` does all of it).
    """
    if isinstance(model, FSDPModule):
        raise ValueError("parallelize: model is already sharded with FSDP2")
    low = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        raise ValueError(
            f"parallelize: trainable parameters must be fp32 master weights; {low[0]} is not ({len(low)} in all)"
        )
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype or default_param_dtype(mesh.device_type), reduce_dtype=reduce_dtype
    )
    if activation_checkpointing and hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(False)
    tower = vision_tower(model)
    for block in vision_blocks(model):
        if activation_checkpointing:
            composable_checkpoint(block)
        _shard(block, mesh, policy, reshard_after_forward)
    if tower is not None:
        _shard(tower, mesh, policy, reshard_after_forward)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        if activation_checkpointing:
            composable_checkpoint(block)
        _shard(block, mesh, policy, reshard_after_forward and i < len(blocks) - 1)
    _shard(model, mesh, policy, False)
    if not any(p.is_meta for p in model.parameters()):
        lazy_init(model)
    return model


def lazy_init(model: nn.Module) -> nn.Module:
    """Run FSDP2's lazy initialisation from the root now (``parallelize`` does, unless the model is on meta).

    FSDP2 initialises lazily: the first unit to run forward becomes the root. Generation calls the vision tower
    and the blocks directly, so one of them would claim the root and the model's own forward would then fail.
    Initialise from the model, as its first forward would (private API: torch has no public one). A model sharded
    on the meta device must be materialised (``to_empty``) first.
    """
    model._get_fsdp_state()._lazy_init()
    return model


def _shard(module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reshard: bool) -> None:
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    setattr(module, _RESHARD_ATTR, reshard)


def fsdp_modules(model: nn.Module) -> Sequence[FSDPModule]:
    """Every FSDP2 unit inside ``model`` (root included)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Hold all parameters gathered (in the compute dtype) for the duration, e.g. for rollouts.

    Inside, forwards issue no collectives, so ranks may run different numbers of forwards (generation of
    different lengths) without deadlocking. Memory: one full copy of the model per rank. Use under no_grad.
    """
    units = fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, _RESHARD_ATTR, True), recurse=False)
