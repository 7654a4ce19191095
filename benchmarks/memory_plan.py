"""Memory plan of a recipe at scale: per rank and phase, what lives on each GPU, and host RAM per node.

    python -m benchmarks.memory_plan --config recipes/configs/grpo_qwen2_5_vl_7b.toml --gpus 8 [--nodes 2]
    python -m benchmarks.memory_plan --config recipes/configs/grpo_qwen2_5_vl_7b.toml --gpus 8 --lora.enabled false
    python -m benchmarks.memory_plan --config recipes/configs/sft_qwen2_5_vl_7b.toml --gpus 8 --model tiny

The model is built on the meta device (no memory, no weights): ``--model 7b`` (default) is Qwen2.5-VL-7B's
published shape (``engine.models.config.qwen2_5_vl_7b_config``), ``tiny`` the embedded default, anything else a
checkpoint folder's config.json. LoRA and freezing are applied as the recipe does, then every parameter is
assigned to its FSDP2 unit (``engine.distributed.parallelize``: each vision block, the vision tower, each decoder
block, the root) and its per-rank shard is sized as FSDP2 pads it (``ceil(rows / shard ranks)`` rows). Further
overrides (``--rl.max_completion_length 1024``, ``--train.dp_replicate 2``) are the recipe's own keys.

Phases, as the engine runs them (``--gpus`` per node, ``--nodes``; HSDP with ``train.dp_replicate``):

* load: the shards being filled (trainable fp32, frozen in bf16 on GPU) + one slice read from the files;
* rollout: all parameters gathered in bf16 (``unsharded``) + the static decode step's buffers (fused q/k/v and
  their adapters' fused factors, ``fused_qkv_bytes``) + the KV cache of every rollout row (prompt + views +
  completion, bf16, allocated once at that capacity) + prefill temporaries;
* reference: β > 0 log-probs under no_grad (the full-fine-tuning reference is its own bf16 shards);
* update: + fp32 gradient shards + AdamW moments (2 x fp32) + the root and two blocks gathered + saved activations
  of one micro-batch (block inputs with activation checkpointing) + one block's recomputed activations + one unit's
  unsharded fp32 gradient before its reduce-scatter + the loss kernel's O(N·H) buffers;
* checkpoint: DCP writes trainable shards and optimiser state, one tensor at a time through the host;
* export: one parameter gathered at a time (LoRA merged in fp32) and, on rank 0, one safetensors file on the host.

Everything persistent is exact (from the shapes); activations and temporaries are estimates from the shapes and
the config (formulas below), without allocator fragmentation; the CUDA context and NCCL buffers are a fixed
reserve. Host RAM per node: a fixed per-process baseline (torch, CUDA context, data) plus the phases' host
temporaries. The verdict compares the largest phase plus the reserve with the GPU's memory.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
CUDA_RESERVE = 2.5 * GB  # CUDA context, NCCL communicators and their buffers, cuBLAS workspaces
PROCESS_HOST_BASELINE = 3.0 * GB  # per rank on the host: torch + CUDA runtime, the dataset, the processor
PROMPT_TEXT_TOKENS = 256  # system prompt, question, SIF instruction, chat tags


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]
    trainable: bool
    unit: str
    lora_adapted: bool = False  # a base weight with an adapter beside it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, shard_ranks: int) -> int:
        rows = -(-self.shape[0] // shard_ranks) if self.shape else 1
        return rows * math.prod(self.shape[1:])


@dataclass
class Phase:
    name: str
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per rank by item
    temporaries: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes), the largest counts
    host: float = 0.0  # host temporaries per rank
    host_rank0: float = 0.0  # extra host bytes on rank 0 only

    @property
    def largest_temporary(self) -> tuple[str, float]:
        return max(self.temporaries, key=lambda t: t[1], default=("", 0.0))

    @property
    def total(self) -> float:
        return sum(self.gpu.values()) + self.largest_temporary[1]


def model_config(which: str):
    from engine.models import load_model_config, tiny_config
    from engine.models.config import qwen2_5_vl_7b_config

    if which == "7b":
        return qwen2_5_vl_7b_config()
    if which == "tiny":
        return tiny_config()
    return load_model_config(which)


def recipe_config(config_file: str, overrides: list[str]):
    """The recipe's full config (GRPO when the file has an ``[rl]`` table, else SFT) with the file and overrides."""
    from engine.config import load_config, read_config_file

    if "rl" in read_config_file(config_file):
        from engine.recipes.grpo_sif import GRPORecipeConfig

        return "grpo", load_config(GRPORecipeConfig(), ["--config", config_file, *overrides])
    from engine.recipes.sft_sif import SFTRecipeConfig

    return "sft", load_config(SFTRecipeConfig(), ["--config", config_file, *overrides])


def model_params(config, lora_cfg) -> list[Param]:
    """Every parameter of the meta-built model with LoRA / freezing applied, tagged with its FSDP2 unit."""
    from engine.models import VLModel
    from engine.train.lora import LoRALinear, apply_lora, freeze_vision_tower

    with torch.device("meta"):
        model = VLModel(config)
    if lora_cfg.enabled:
        apply_lora(model, lora_cfg)
    elif lora_cfg.freeze_vision:
        freeze_vision_tower(model)
    adapted = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    params = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("visual.blocks."):
            unit = ".".join(parts[:3])
        elif name.startswith("visual."):
            unit = "visual"
        elif name.startswith("model.layers."):
            unit = ".".join(parts[:3])
        else:
            unit = "root"
        params.append(Param(name, tuple(p.shape), p.requires_grad, unit, name in adapted))
    return params


QKV = ("q_proj", "k_proj", "v_proj")


def fused_qkv_bytes(params: list[Param]) -> int:
    """What the static decode step allocates besides the cache: per decoder layer one bf16 q/k/v projection
    [(Hq + 2 Hkv)·D, H] with its bias and, for adapted q/k/v, their factors side by side (A [Σr, H]) and
    block-diagonal (s·B [(Hq + 2 Hkv)·D, Σr]). Every other weight, LoRA included, is read where it lives."""
    qkv = [p for p in params if p.name.startswith("model.layers.") and p.name.split(".")[-2] in QKV]
    dense = sum(p.numel for p in qkv if p.name.endswith((".weight", ".bias")))
    a_rows = [p for p in qkv if p.name.endswith(".lora_A")]
    rank_per_layer = sum(p.shape[0] for p in a_rows) // max(1, len({p.unit for p in a_rows}))
    out_rows = sum(p.shape[0] for p in qkv if p.name.endswith(".weight")) // max(1, len({p.unit for p in qkv}))
    factors = sum(p.numel for p in a_rows) + len({p.unit for p in a_rows}) * out_rows * rank_per_layer
    return (dense + factors) * 2


def plan(kind: str, cfg, config, gpus: int, nodes: int, gpu_bytes: float = 80 * GB) -> dict:
    """The per-rank, per-phase bytes (see the module docstring) and host RAM per node."""
    world = gpus * nodes
    replicate = cfg.train.dp_replicate or nodes
    if world % replicate:
        raise SystemExit(f"train.dp_replicate {replicate} does not divide {world} ranks")
    shard = world // replicate
    params = model_params(config, cfg.lora)
    t, v = config.text, config.vision
    frozen_bytes = 2  # bf16 on GPU (engine.recipes.policy.storage_dtype)
    trainable = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]
    w_train = sum(p.shard_numel(shard) for p in trainable) * 4
    w_frozen = sum(p.shard_numel(shard) for p in frozen) * frozen_bytes
    weights = w_train + w_frozen
    grads = w_train
    optim = 2 * w_train
    units: dict[str, int] = {}
    unit_trainable: dict[str, int] = {}
    for p in params:
        units[p.unit] = units.get(p.unit, 0) + p.numel
        unit_trainable[p.unit] = unit_trainable.get(p.unit, 0) + (p.numel if p.trainable else 0)
    full_bf16 = sum(p.numel for p in params) * 2
    root_bf16 = units["root"] * 2
    block_bf16 = max(n for u, n in units.items() if u.startswith("model.layers.")) * 2

    grpo = kind == "grpo"
    rl = cfg.rl if grpo else None
    reference = 0.0
    if grpo and rl.beta != 0.0 and not cfg.lora.enabled:
        reference = sum(p.shard_numel(shard) for p in params) * frozen_bytes

    # sequence shape
    image_tokens = cfg.data.max_pixels // (28 * 28)
    images = 1 + int(bool(grpo and rl.depth_in_prompt) or (not grpo and cfg.data.with_depth))
    prompt = images * image_tokens + PROMPT_TEXT_TOKENS
    views = 0
    if grpo and rl.focus_mode == "crop":
        views = rl.max_views * (rl.crop_size // 28) ** 2 * (2 if rl.depth_views else 1)
    completion = rl.max_completion_length if grpo else 0
    seq = prompt + views + completion if grpo else cfg.data.max_seq_len
    per_rank_prompts = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    if grpo:
        per_rank_prompts = getattr(rl, "rollout_prompts_per_rank", 0) or per_rank_prompts
    g = rl.num_generations if grpo else 1
    rows = per_rank_prompts * g
    mb_tokens = cfg.train.micro_batch_size * g * seq
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2
    patches = images * image_tokens * v.spatial_merge_size**2

    phases: list[Phase] = []
    largest_param = max(p.shard_numel(1) * (4 if p.trainable else frozen_bytes) for p in params)
    largest_slice = max(p.shard_numel(shard) * 4 for p in params)  # read in the file's dtype (<= fp32)
    load = Phase("load", {"weights": weights})
    load.temporaries.append(("one slice being read", largest_slice))
    load.host = largest_slice
    phases.append(load)

    if grpo:
        roll = Phase("rollout", {"weights": weights, "reference": reference, "gathered": full_bf16})
        roll.gpu["static step copies"] = fused_qkv_bytes(params)
        roll.gpu["KV cache"] = rows * (prompt + views + completion + 1) * kv_per_token
        prefill_tokens = per_rank_prompts * prompt
        roll.temporaries += [
            ("prefill block activations", prefill_tokens * (4 * t.hidden_size + 3 * t.intermediate_size) * 2),
            ("vision tower activations", per_rank_prompts * patches * (4 * v.hidden_size + 3 * v.intermediate_size)
             * 2),
            ("next-token logits", rows * t.vocab_size * 4 * 2),
        ]  # fmt: skip
        phases.append(roll)

    act_tokens = mb_tokens
    block_acts = act_tokens * (8 * t.hidden_size + 4 * t.intermediate_size + 2 * t.num_key_value_heads * t.head_dim) * 2
    if cfg.lora.enabled:
        block_acts += act_tokens * 7 * cfg.lora.rank * 2 + act_tokens * (4 * t.hidden_size + t.intermediate_size) * 2
    saved = (act_tokens * t.hidden_size * 2 * t.num_hidden_layers) if cfg.train.activation_checkpointing else (
        block_acts * t.num_hidden_layers)  # fmt: skip
    vision_trainable = any(p.trainable for p in params if p.unit.startswith("visual"))
    if vision_trainable:
        vis_patches = (cfg.train.micro_batch_size * g) * patches
        saved += vis_patches * v.hidden_size * 2 * (v.depth if cfg.train.activation_checkpointing else 8 * v.depth)
    head = act_tokens * t.hidden_size * 4 * 2  # fused log-prob kernel: fp32 dH [N, H] + the hidden rows
    gathered_units = root_bf16 + 2 * block_bf16  # root stays gathered; one block computing, the next prefetched

    if grpo and rl.beta != 0.0:
        ref = Phase("reference", {"weights": weights, "reference": reference, "gathered": gathered_units})
        ref.temporaries += [
            ("one block's activations (no grad)", act_tokens * (4 * t.hidden_size + 3 * t.intermediate_size) * 2),
            ("log-prob kernel buffers", head),
        ]
        phases.append(ref)

    upd = Phase(
        "update",
        {"weights": weights, "gradients": grads, "optimiser": optim, "reference": reference,
         "gathered": gathered_units, "activations": saved},
    )  # fmt: skip
    biggest_unit_grad = max(unit_trainable.values()) * 4
    upd.temporaries += [
        ("one block recomputed" if cfg.train.activation_checkpointing else "", block_acts),
        ("one unit's unsharded fp32 gradient", biggest_unit_grad),
        ("log-prob kernel buffers", head),
    ]
    phases.append(upd)

    ckpt = Phase("checkpoint", {"weights": weights, "optimiser": optim, "reference": reference})
    largest_saved = max((p.shard_numel(shard) * 4 for p in trainable), default=0)
    ckpt.temporaries.append(("one tensor staged to the host", largest_saved))
    ckpt.host = largest_saved
    phases.append(ckpt)

    exp = Phase("export", {"weights": weights, "optimiser": optim, "reference": reference})
    merged_tmp = max((p.numel * 4 + p.numel * frozen_bytes for p in params if p.lora_adapted), default=0)
    exp.temporaries += [("one parameter gathered", largest_param), ("one LoRA merge (fp32)", merged_tmp)]
    shard_file = min(cfg.train.export_max_shard_mb * 2**20, sum(p.numel for p in params) * 2)
    exp.host_rank0 = shard_file + largest_param
    phases.append(exp)

    host_node = gpus * (PROCESS_HOST_BASELINE + max(ph.host for ph in phases)) + max(ph.host_rank0 for ph in phases)
    peak = max(phases, key=lambda ph: ph.total)
    return {
        "kind": kind,
        "world": world,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "replicate": replicate,
        "shard_ranks": shard,
        "params": sum(p.numel for p in params),
        "trainable": sum(p.numel for p in trainable),
        "rollout_rows": rows if grpo else 0,
        "sequence_tokens": seq,
        "micro_batch_tokens": mb_tokens,
        "phases": phases,
        "host_per_node": host_node,
        "peak_phase": peak.name,
        "peak": peak.total,
        "gpu_bytes": gpu_bytes,
        "fits": peak.total + CUDA_RESERVE <= gpu_bytes,
        "checkpoint_bytes_bf16": sum(p.numel for p in params if not p.name.endswith(("lora_A", "lora_B"))) * 2,
    }


COLUMNS = ("weights", "gradients", "optimiser", "reference", "gathered", "static step copies", "KV cache",
           "activations")  # fmt: skip


def format_plan(result: dict, title: str = "") -> str:
    gb = lambda x: f"{x / GB:6.2f}"  # noqa: E731
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"{result['kind']}: {result['params'] / 1e9:.2f} B parameters, {result['trainable'] / 1e6:.1f} M trainable; "
        f"{result['world']} ranks = {result['nodes']} node(s) x {result['gpus_per_node']} GPUs, "
        f"{'HSDP ' + str(result['replicate']) + ' x ' if result['replicate'] > 1 else 'FSDP over '}"
        f"{result['shard_ranks']} shard ranks; sequence {result['sequence_tokens']} tokens, "
        f"micro-batch {result['micro_batch_tokens']} tokens"
        + (f", {result['rollout_rows']} rollout rows per rank" if result["rollout_rows"] else "")
    )
    head = "| phase | " + " | ".join(COLUMNS) + " | largest temporary | total GB/rank |"
    lines += [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for ph in result["phases"]:
        what, tmp = ph.largest_temporary
        cells = [gb(ph.gpu.get(c, 0.0)) if ph.gpu.get(c) else "     -" for c in COLUMNS]
        lines.append(f"| {ph.name} | " + " | ".join(cells) + f" | {gb(tmp)} ({what}) | {gb(ph.total)} |")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(
        f"peak {result['peak'] / GB:.2f} GB per rank ({result['peak_phase']}) + {CUDA_RESERVE / GB:.1f} GB CUDA/NCCL "
        f"reserve: {verdict} in an {result['gpu_bytes'] / GB:.0f} GB GPU; host RAM per node "
        f"{result['host_per_node'] / GB:.1f} GB ({PROCESS_HOST_BASELINE / GB:.0f} GB baseline per rank + phase "
        f"temporaries + rank 0's export file); bf16 checkpoint {result['checkpoint_bytes_bf16'] / GB:.1f} GB, "
        f"{result['checkpoint_bytes_bf16'] / result['shard_ranks'] / GB:.2f} GB read per rank at load"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a recipe TOML (GRPO if it has [rl], else SFT)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--model", default="7b", help="7b | tiny | a checkpoint folder")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args, overrides = ap.parse_known_args(argv)
    kind, cfg = recipe_config(args.config, overrides)
    result = plan(kind, cfg, model_config(args.model), args.gpus, args.nodes, args.gpu_gb * GB)
    lora = f"LoRA r={cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    print(format_plan(result, f"## {Path(args.config).name}, model {args.model}, {lora}"))
    return result


if __name__ == "__main__":
    main()
