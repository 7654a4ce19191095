"""Build a model sharded from the start: meta-device build → FSDP2 ``fully_shard`` → ``to_empty`` → sharded load.

No rank ever holds the whole model. The model is built on the meta device (no memory), LoRA adapters are
injected and frozen parameters given their storage dtype there, ``engine.distributed.parallelize`` shards the
meta model (FSDP2 records each parameter's placement without allocating), ``to_empty`` allocates only this rank's
shards on the training device, and ``engine.models.loading.load_weights_sharded`` fills them with the slices of
the safetensors files that this rank owns (``safe_open(...).get_slice``; sharded HF checkpoints with an index
included). LoRA adapters are then initialised deterministically (``lora_A`` drawn exactly as ``apply_lora`` draws
it on an unsharded model, ``lora_B`` zero), so sharded and unsharded runs start from identical weights.

Memory per rank: its shards (trainable parameters fp32, frozen ones in ``frozen_dtype``, bf16 on GPU) plus one
slice being read. The full-fine-tuning reference policy (:func:`sharded_frozen_copy`) is a second sharded model
whose local shards are copies of the policy's, cast to ``dtype``: it shares no storage with the policy and costs
exactly its own shards. The pattern follows torchtitan's meta-device init (build on meta, ``fully_shard``,
``to_empty``, initialise or load the local shards); loading reads HF safetensors rather than a DCP checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from engine.config import LoRAConfig
from engine.distributed.parallel import lazy_init, parallelize
from engine.models.config import load_model_config
from engine.models.loading import LoadStats, _local_region, load_weights_sharded
from engine.models.model import VLModel
from engine.train.lora import apply_lora, freeze_vision_tower, initial_lora_A, lora_modules


def set_storage_dtypes(model: nn.Module, trainable: torch.dtype, frozen: torch.dtype) -> None:
    """Give every parameter of a meta (or real) model its storage dtype: ``trainable`` for ``requires_grad``
    parameters (the fp32 masters), ``frozen`` for the others. Parameters shared between modules stay shared."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                dtype = trainable if param.requires_grad else frozen
                done[id(param)] = (
                    param
                    if param.dtype == dtype
                    else nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                )
            module._parameters[name] = done[id(param)]


@torch.no_grad()
def init_lora_shards(model: nn.Module, seed: int) -> int:
    """Set every adapter to its initial value (``lora_A`` as :func:`engine.train.lora.apply_lora` draws it,
    ``lora_B`` zero), writing only this rank's shard of each; returns the number of adapters."""
    count = 0
    for name, module in lora_modules(model):
        local, index = _local_region(module.lora_A)
        if local.numel():
            local.copy_(initial_lora_A(module, name, seed)[index])
        _local_region(module.lora_B)[0].zero_()
        count += 1
    return count


def build_sharded_model(
    path: str | Path,
    mesh: DeviceMesh,
    device: torch.device | str,
    *,
    lora: LoRAConfig | None = None,
    freeze_vision: bool = False,
    frozen_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    seed: int = 0,
) -> tuple[VLModel, LoadStats]:
    """The checkpoint at ``path`` as a FSDP2-sharded VLModel on ``device`` (see the module docstring).

    lora: adapters to inject (``lora.enabled``); otherwise full fine-tuning, with the vision tower frozen if
    ``freeze_vision``. frozen_dtype: storage of frozen parameters (a LoRA base, a frozen tower); trainable ones are
    fp32. Returns the model in eval mode and what this rank read.
    """
    config = load_model_config(path)
    with torch.device("meta"):
        model = VLModel(config)
    if lora is not None and lora.enabled:
        apply_lora(model, lora, seed=seed)
    elif freeze_vision:
        freeze_vision_tower(model)
    set_storage_dtypes(model, torch.float32, frozen_dtype)
    parallelize(
        model, mesh, activation_checkpointing=activation_checkpointing, reshard_after_forward=reshard_after_forward
    )
    model.to_empty(device=device)
    adapters = [f"{name}.{p}" for name, _ in lora_modules(model) for p in ("lora_A", "lora_B")]
    stats = load_weights_sharded(model, path, skip=adapters)
    init_lora_shards(model, seed)
    lazy_init(model)
    return model.eval(), stats


@torch.no_grad()
def sharded_frozen_copy(policy: nn.Module, mesh: DeviceMesh, dtype: torch.dtype) -> VLModel:
    """A frozen copy of the sharded VLModel ``policy`` (the reference policy of full fine-tuning), itself sharded
    the same way over ``mesh``: each rank copies its own shards of the policy, cast to ``dtype``. Nothing is shared
    with the policy and no rank ever holds a full copy. Call before training changes the policy."""
    if lora_modules(policy):
        raise ValueError("sharded_frozen_copy: the policy has LoRA adapters; its reference is the adapters-off base")
    with torch.device("meta"):
        ref = VLModel(policy.config)
    ref.requires_grad_(False)
    set_storage_dtypes(ref, dtype, dtype)
    parallelize(ref, mesh, param_dtype=dtype if mesh.device_type == "cuda" else None)
    device = next(policy.parameters()).device
    ref.to_empty(device=device)
    source = dict(policy.named_parameters())
    for name, param in ref.named_parameters():
        dst, _ = _local_region(param)
        src, _ = _local_region(source[name])
        if dst.shape != src.shape:
            raise ValueError(f"sharded_frozen_copy: {name} is sharded differently ({dst.shape} vs {src.shape})")
        dst.copy_(src)
    lazy_init(ref)
    return ref.eval()
