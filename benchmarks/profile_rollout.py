"""Where a GRPO rollout's time goes: one ``generate_rollouts`` call under ``torch.profiler``, as the trainer runs it.

    python -m benchmarks.profile_rollout --device cuda --size 0.5b --prompts 8 --num-generations 8 --max-completion 64
    python -m benchmarks.profile_rollout                       # tiny model, CPU

The policy is wrapped as in training (FSDP2 ``parallelize``, parameters gathered once with ``unsharded``), so the
per-block FSDP hooks are in the profile too. Prints the wall time per decode step beside (CUDA) the GPU time per
step (the kernels' and copies' device time summed), the top operators by self CPU time and (CUDA) by self device
time, and how many host↔device synchronisations and copies one rollout makes: on a GPU a launch-bound decode loop
shows up as a step time well above its GPU time. ``--decode graph_async`` runs the step one ahead of the host's
bookkeeping (``engine.models.generate``). ``--trace`` writes a Chrome trace.
A model of ``--size`` with random weights is created once under ``--work`` (see ``benchmarks.train_step``).

A random model never closes an ``<area>`` and rarely stops, so every row runs to ``--max-completion``. With
``--script traces`` each sample instead writes a SIF trace of the bundled records token by token (sample j of
prompt p the trace of record p·G + j, so lengths differ within a group), its log-probs taken from the real
logits: natural lengths (finished rows leave the batch) and, in crop mode, real ``</area>`` splices, with the
model's real cost. ``--timing-runs K`` also times K rollouts without the profiler and prints their median.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import random_checkpoint
from engine.config import DataConfig, LoRAConfig, ModelSection
from engine.distributed import init_distributed, parallelize, unsharded
from engine.recipes.policy import load_policy
from engine.recipes.splits import load_split
from engine.rl.grpo import RLConfig
from engine.rl.prompts import build_prompt
from engine.rl.rollout import generate_rollouts

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_EVENTS = ("cudaMemcpyAsync", "cudaMemcpy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="tiny", choices=("tiny", "0.5b"))
    p.add_argument("--mode", default="text", choices=("text", "crop"))
    p.add_argument(
        "--decode", default="graph", choices=("graph", "graph_async", "static", "eager"), help="RLConfig.decode"
    )
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=64)
    p.add_argument("--rows", type=int, default=15, help="operators listed per table")
    p.add_argument("--trace", default="", help="write a Chrome trace here")
    p.add_argument("--work", default="benchmarks/out", help="where the random checkpoint is created once")
    p.add_argument("--script", default="none", choices=("none", "traces"), help="scripted samples (see above)")
    p.add_argument("--timing-runs", type=int, default=0, help="extra rollouts timed without the profiler")
    return p.parse_args(argv)


class ScriptedSampler:
    """Stands in for ``generate.sample_tokens``: live sample i emits ``scripts[i]`` token by token, in the live
    samples' order (generate's); a sample leaves after its last token (its ``</answer>`` stops it) or
    ``max_new`` tokens. Log-probs are the real logits' at the temperature."""

    def __init__(self, scripts: list[list[int]], max_new: int) -> None:
        self.scripts, self.max_new = scripts, max_new
        self.live = list(range(len(scripts)))
        self.pos = [0] * len(scripts)

    def __call__(self, logits, temperature, top_p, generator, banned=()):
        if logits.shape[0] != len(self.live):
            raise RuntimeError(f"scripted sampler: {logits.shape[0]} rows for {len(self.live)} live samples")
        tokens = torch.tensor([self.scripts[i][self.pos[i]] for i in self.live])
        for i in self.live:
            self.pos[i] += 1
        self.live = [i for i in self.live if self.pos[i] < min(len(self.scripts[i]), self.max_new)]
        scaled = logits.float() / (temperature if temperature > 0 else 1.0)
        logp = torch.log_softmax(scaled, -1).gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1)
        return tokens.to(logits.device), logp


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with init_distributed(args.device) as env:
        checkpoint = random_checkpoint(args.work, args.size, env)
        model, processor = load_policy(checkpoint, ModelSection(), LoRAConfig(), DataConfig(max_pixels=224 * 224), 0)
        model = parallelize(model, env.mesh)
        rl = RLConfig(
            num_generations=args.num_generations,
            max_completion_length=args.max_completion,
            focus_mode=args.mode,
            decode=args.decode,
        )
        records = load_split("", "train", args.prompts)
        prompts = [build_prompt(r, processor, with_depth=rl.depth_in_prompt) for r in records]

        gen_module = importlib.import_module("engine.models.generate")  # the package re-exports the function

        traces = [processor.tokenizer.encode(r.response()) for r in load_split("", "train", 0)]
        g = args.num_generations
        scripts = [traces[(p * g + j) % len(traces)] for p in range(len(prompts)) for j in range(g)]
        sample_tokens = gen_module.sample_tokens
        engine = None
        if hasattr(gen_module, "DecodeEngine"):  # one per run, as GRPOBatchSource keeps it
            engine = gen_module.DecodeEngine(keep_cache=rl.keep_kv_cache)

        def rollout():
            generator = torch.Generator(device=env.device).manual_seed(0)
            if args.script == "traces":
                gen_module.sample_tokens = ScriptedSampler(scripts, args.max_completion)
            kwargs = {"engine": engine} if engine is not None else {}
            try:
                with torch.no_grad(), unsharded(model):
                    return generate_rollouts(model, processor, prompts, rl, generator=generator, **kwargs)
            finally:
                gen_module.sample_tokens = sample_tokens

        rollout()  # warm-up: allocator, kernels, FSDP lazy state
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            batch = rollout()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if not env.is_main:
            return
        steps = max(int(r.completion_mask.sum()) for r in batch.rollouts)
        tokens = sum(int(r.completion_mask.sum()) for r in batch.rollouts)
        print(
            f"rollout ({args.decode}): {len(batch.rollouts)} samples, {tokens} tokens in {seconds:.3f} s "
            f"({tokens / seconds:.0f} tokens/s), {steps} decode steps, {1e3 * seconds / max(steps, 1):.2f} ms per step"
        )
        events = prof.key_averages()
        if args.device == "cuda":
            gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
            step_ms, gpu_ms = 1e3 * seconds / max(steps, 1), 1e-3 * gpu_us / max(steps, 1)
            print(f"step time {step_ms:.2f} ms, GPU time {gpu_ms:.2f} ms per step ({step_ms / gpu_ms:.2f} x)")
        counts = {e.key: e.count for e in events}
        syncs = sum(counts.get(k, 0) for k in SYNC_EVENTS)
        copies = sum(counts.get(k, 0) for k in COPY_EVENTS)
        print(f"per decode step: {syncs / max(steps, 1):.1f} synchronisations, {copies / max(steps, 1):.1f} copies")
        print(f"views spliced: {batch.num_views}; decode stats: {getattr(batch, 'decode_stats', None)}")
        if args.timing_runs:  # min and median: on a shared machine the minimum is the least disturbed
            wall, cpu = [], []
            for _ in range(args.timing_runs):
                start, start_cpu = time.perf_counter(), time.process_time()
                rollout()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            print(
                f"unprofiled rollout x{len(wall)}: wall min {min(wall):.3f} s, median {statistics.median(wall):.3f} s "
                f"({1e3 * min(wall) / max(steps, 1):.2f} ms per step at the min); "
                f"process CPU min {min(cpu):.3f} s, median {statistics.median(cpu):.3f} s"
            )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.device == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        if args.trace:
            prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
