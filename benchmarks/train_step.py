"""GRPO-SIF step time, split into rollout / reward / reference / policy update, and tokens per second.

    python -m benchmarks.train_step                                  # tiny model, CPU, text mode
    python -m benchmarks.train_step --model runs/sft-tiny/hf --mode crop
    python -m benchmarks.train_step --size 0.5b --device cuda --prompts 8 --num-generations 8 --peak-tflops 989
    torchrun --nproc_per_node=8 -m benchmarks.train_step --model /ckpt/Qwen2.5-VL-3B --device cuda --peak-tflops 989

Runs the real Trainer with the real GRPO batch source for ``--steps`` steps (the first ``--warmup`` excluded
from the medians) and reads the phases back from metrics.jsonl. Without ``--model`` it uses a model of ``--size``
(tiny, or a Qwen2.5-0.5B-shaped decoder with the full 151936-row vocabulary) with random weights, created once
under the output folder: its samples rarely stop early, so every completion is ``--max-completion`` tokens and
the work per step is fixed. (A random model never closes an ``<area>``, so
crop-mode figures need a trained checkpoint.)
Update throughput counts the packed tokens of the policy forward + backward; the FLOP estimate is
6 · N_params · tokens (+ 2 · N · tokens for the reference forward when β > 0), so MFU is printed only with
``--peak-tflops``. Writes ``benchmarks/out/train_step.json`` (or ``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import environment, markdown_table, random_checkpoint, write_json
from engine.config import DataConfig, LoRAConfig, ModelSection, TrainConfig
from engine.distributed import init_distributed
from engine.recipes.policy import frozen_copy, load_policy
from engine.recipes.splits import load_split
from engine.rl.grpo import GRPOObjective, RLConfig
from engine.rl.source import GRPOBatchSource
from engine.rl.step import grpo_step
from engine.train.metrics import read_metrics
from engine.train.trainer import Trainer

PHASES = ("rollout", "reward", "reference", "update")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: a random model of --size)")
    p.add_argument("--size", default="tiny", choices=("tiny", "0.5b"), help="the random model's shape")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mode", default="text", choices=("text", "crop"))
    p.add_argument(
        "--decode", default="graph", choices=("graph", "graph_async", "static", "eager"), help="RLConfig.decode"
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2, help="prompts per rank per step")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lora", action="store_true", help="LoRA r=64 instead of full fine-tuning")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: not printed)")
    p.add_argument("--out", default="benchmarks/out/train_step.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    work = Path(args.out).parent
    with init_distributed(args.device) as env:
        checkpoint = Path(args.model) if args.model else random_checkpoint(work, args.size, env)
        lora = LoRAConfig(enabled=args.lora, rank=64, alpha=128.0)
        model, processor = load_policy(checkpoint, ModelSection(), lora, DataConfig(max_pixels=224 * 224), seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        rl = RLConfig(
            num_generations=args.num_generations,
            beta=args.beta,
            max_completion_length=args.max_completion,
            focus_mode=args.mode,
            decode=args.decode,
        )
        train = TrainConfig(
            run_name="train_step_run", output_dir=str(work), max_steps=args.steps, micro_batch_size=args.prompts,
            progress_bar=False, plot=False, export_hf=False, lr=1e-5,
        )  # fmt: skip
        reference = frozen_copy(model, env) if args.beta and not args.lora else None
        source = GRPOBatchSource(
            load_split("", "train"), processor, model.config, rl, micro_batch_size=args.prompts,
            grad_accum_steps=1, rank=env.rank, world_size=env.world_size, reference=reference,
        )  # fmt: skip
        trainer = Trainer(model, GRPOObjective(rl), source, train, env=env, phase="grpo", step_fn=grpo_step)
        trainer.fit()
        rows = read_metrics(trainer.metrics_log.path)[args.warmup :] if env.is_main else []
    if not env.is_main:
        return {}
    med = lambda key: statistics.median(float(r.get(key, 0.0)) for r in rows)
    sequences = args.prompts * args.num_generations * env.world_size
    row = {
        "mode": args.mode,
        "decode": args.decode,
        "ranks": env.world_size,
        "sequences": sequences,
        "completion_tokens": med("rollout/completion_tokens"),
        **{f"{ph}_s": med(f"time/{ph}") for ph in PHASES},
        "step_s": med("time/step"),
        "rollout_tok_s": med("rollout/tokens_per_s") * env.world_size,
        "update_tok_s": med("tokens_per_s") * med("time/step") / max(med("time/update"), 1e-9),
    }
    flops_per_token = (6 + (2 if rl.beta else 0)) * n_params
    row["update_tflops"] = row["update_tok_s"] * flops_per_token / 1e12
    if args.peak_tflops:
        row["mfu"] = row["update_tflops"] / (args.peak_tflops * env.world_size)
    columns = [
        ("mode", "mode"), ("decode", "decode"), ("ranks", "ranks"), ("sequences", "seqs/step"),
        ("completion_tokens", "compl. tok"),
        ("rollout_s", "rollout s"), ("reward_s", "reward s"), ("reference_s", "ref s"), ("update_s", "update s"),
        ("step_s", "step s"), ("rollout_tok_s", "rollout tok/s"), ("update_tok_s", "update tok/s"),
        ("update_tflops", "update TFLOP/s"),
    ] + ([("mfu", "MFU")] if args.peak_tflops else [])  # fmt: skip
    print(f"GRPO-SIF train step, {n_params / 1e6:.1f} M params, {args.device}, median of {len(rows)} steps")
    print(markdown_table([row], columns))
    payload = {"environment": environment(args.device), "args": vars(args), "params": n_params, "result": row}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
