"""GRPO step time of this engine against TRL's GRPOTrainer, side by side: same checkpoint, prompts and settings.

    /path/to/venv-with-trl/bin/python -m benchmarks.trl_compare --checkpoint runs/sft-tiny/hf --steps 5

Runs from the repository root in a Python that has ``trl`` (plus ``accelerate`` and ``datasets``) next to this
package, e.g. a venv over the global site-packages that leaves torch and transformers as they are:
``python -m venv --system-site-packages /work/venv-trl && /work/venv-trl/bin/pip install trl==1.16.0 accelerate
datasets`` (the TRL phases are timed around TRL 1.16's private methods; another version may leave some at 0).
Each side runs in its own fresh process, ``--rounds`` times, interleaved (ours, TRL, ours, TRL, ...) to spread
machine drift over both; every run does ``--steps`` GRPO steps of which the first ``--warmup`` are dropped,
and the table shows the medians over the remaining steps of all rounds.

Shared settings: one prompt per step (the bundled training records in file order, no shuffling), G completions
per prompt, the same max completion length, temperature, top-p 1, β (a frozen reference model), ε, lr (constant,
no warm-up), grad-norm clip 1, AdamW, fp32, full fine-tuning with the vision tower frozen (``LoRAConfig``'s
default and the 7B configs'; ``--train-vision`` trains it on both sides, as the tiny recipes now do), one
process, no activation checkpointing (TRL's default would turn it on), one policy update per generated batch
(``grpo`` loss type, group-std-scaled advantages). The prompt is ``engine.rl.prompts``' SIF prompt (text mode:
RGB image + question + SIF instruction); TRL gets it as a conversational prompt with the same image and text, and
the script checks that TRL's processor turns it into exactly our token ids and pixel values. The reward is
``engine.rl.rewards.score_completions`` (format + answer with progress + grounding + depth) on both sides, wrapped
as one TRL reward function, so the reward work is identical.

Completion length: an under-trained checkpoint stops at a random point, so by default both sides are forced to
sample exactly ``--max-completion`` tokens per completion: TRL through ``min_new_tokens`` (end-of-turn tokens are
masked until then), ours by not stopping at end-of-turn tokens or ``</answer>`` (a benchmark-only tokenizer
whose ``eos_token_ids`` is empty, and ``engine.rl.rollout.STOP_STRINGS`` emptied in the child process). Then the
work per step is the same token count on both sides. ``--natural-length`` lets both stop as in training; compare
the per-token columns (step ms / completion token) then.

Phases. Ours: ``time/{data,rollout,reward,reference,update}`` from the Trainer (data = decode + tokenise the
prompt). TRL (timed around its methods): data = dataloader fetch + ``_tokenize_prompts`` (chat template, image
processing); rollout = ``_generate_single_turn`` (``model.generate``); reward = ``_calculate_rewards``;
reference = the no-grad ``_get_per_token_logps_and_entropies`` calls (reference model); other = the rest of
``_prepare_inputs`` (second image processing for the forward, padding, advantages, bookkeeping); update = the
rest of the step (policy forward + loss + backward + clip + AdamW). Step = all of it; logging is outside both.
Step CPU s is the process CPU time of the step (all threads): with ``--threads 1`` it hardly moves when other jobs
share the machine, while wall times with 2 threads inflate several-fold under contention; the driver prints the
load average around every run and the cores each run kept busy, so a contended run is visible.
Writes ``benchmarks/out/trl_compare.json`` (or ``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_json
from engine.models.tokenizer import ENDOFTEXT, IM_END

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "rollout", "reward", "reference", "other", "update")
QWEN2_VL_CHAT_TEMPLATE = (
    # The public Qwen2-VL chat template (images only), which engine.models.Processor.render implements.
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF export folder (model.safetensors, config.json, tokenizer)")
    p.add_argument("--steps", type=int, default=5, help="GRPO steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved ours/TRL")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-vision", action="store_true", help="train the vision tower too (default: frozen)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per side (0: torch's default)")
    p.add_argument("--natural-length", action="store_true", help="let completions stop at EOS / </answer>")
    p.add_argument("--decode", default="graph", choices=("graph", "static", "eager"), help="our RLConfig.decode")
    p.add_argument("--side", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--out", default="benchmarks/out/trl_compare.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# shared


def _records(n: int):
    from engine.recipes.splits import load_split

    return load_split("", "train")[:n]


def _pixel_budget(checkpoint: Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) stored in the checkpoint's preprocessor_config.json: both sides use them."""
    from engine.models import processor_from_pretrained

    image = processor_from_pretrained(checkpoint).image
    return image.min_pixels, image.max_pixels


# ---------------------------------------------------------------------------------------------------------------
# our engine


def run_ours(args: argparse.Namespace) -> dict:
    import dataclasses

    import engine.rl.rollout as rollout_module
    from engine.config import DataConfig, LoRAConfig, ModelSection, TrainConfig
    from engine.distributed import init_distributed
    from engine.models.tokenizer import Tokenizer
    from engine.recipes.policy import frozen_copy, load_policy
    from engine.rl.grpo import GRPOObjective, RLConfig
    from engine.rl.source import GRPOBatchSource
    from engine.rl.step import grpo_step
    from engine.train.metrics import read_metrics
    from engine.train.trainer import Trainer

    class NoStopTokenizer(Tokenizer):
        """Benchmark only: no end-of-turn token ends a sample, so every completion is max_completion tokens."""

        @property
        def eos_token_ids(self) -> tuple[int, ...]:
            return ()

    checkpoint = Path(args.checkpoint)
    min_pixels, max_pixels = _pixel_budget(checkpoint)
    with init_distributed("cpu") as env, tempfile.TemporaryDirectory(prefix="trl_compare_ours_") as work:
        data = DataConfig(min_pixels=min_pixels, max_pixels=max_pixels)
        lora = LoRAConfig(freeze_vision=not args.train_vision)
        model, processor = load_policy(checkpoint, ModelSection(), lora, data, seed=args.seed)
        if not args.natural_length:
            processor = dataclasses.replace(processor, tokenizer=NoStopTokenizer(processor.tokenizer.tok))
            rollout_module.STOP_STRINGS = ()
        rl = RLConfig(
            num_generations=args.num_generations,
            beta=args.beta,
            max_completion_length=args.max_completion,
            temperature=args.temperature,
            top_p=1.0,
            decode=args.decode,
        )
        train = TrainConfig(
            run_name="ours", output_dir=work, seed=args.seed, max_steps=args.steps, micro_batch_size=1,
            grad_accum_steps=1, lr=args.lr, schedule="constant", warmup_ratio=0.0, progress_bar=False, plot=False,
            export_hf=False,
        )  # fmt: skip
        reference = frozen_copy(model, env) if args.beta else None
        source = GRPOBatchSource(
            _records(args.steps), processor, model.config, rl, micro_batch_size=1, grad_accum_steps=1,
            seed=args.seed, shuffle=False, reference=reference,
        )  # fmt: skip
        cpu_steps: list[float] = []

        class CPUTimedTrainer(Trainer):
            def train_step(self) -> dict:
                start = time.process_time()
                try:
                    return super().train_step()
                finally:
                    cpu_steps.append(time.process_time() - start)

        trainer = CPUTimedTrainer(model, GRPOObjective(rl), source, train, env=env, phase="grpo", step_fn=grpo_step)
        trainer.fit()
        rows = read_metrics(trainer.metrics_log.path)
    steps = []
    for r, cpu in zip(rows, cpu_steps):
        step = {ph: float(r.get(f"time/{ph}", 0.0)) for ph in ("data", "rollout", "reward", "reference", "update")}
        step["other"] = 0.0
        step["step"] = float(r["time/step"])
        step["cpu"] = cpu
        step["completion_tokens"] = float(r["rollout/completion_tokens"]) * args.num_generations
        step["reward_mean"] = float(r.get("reward/total", float("nan")))
        steps.append(step)
    return {"side": "ours", "steps": steps}


# ---------------------------------------------------------------------------------------------------------------
# TRL


def hf_processor(checkpoint: Path):
    """The processor TRL needs, from our export's files; returns (processor, how it was built).

    Our export holds tokenizer.json + preprocessor_config.json but no chat template. ``AutoProcessor`` is tried
    first; in transformers 5 it also builds the Qwen2-VL *video* processor, which needs torchvision, and this
    machine has no CPU build of torchvision matching torch (PyPI's links CUDA torch). Then the adapter: the same
    ``Qwen2_5_VLProcessor`` from the PIL image processor and the tokenizer, with no video processor (the only
    change: the class check is skipped for that absent attribute). Either way the public Qwen2-VL chat template is
    attached when the checkpoint has none.
    """
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    try:
        processor = AutoProcessor.from_pretrained(checkpoint, padding_side="left")
        how = "AutoProcessor"
    except ImportError as e:  # torchvision missing for the video processor
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
        processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
        how = f"adapter (AutoProcessor failed: {str(e).strip().splitlines()[0][:120]})"
    if not getattr(processor, "chat_template", None):
        processor.chat_template = QWEN2_VL_CHAT_TEMPLATE
        how += " + Qwen2-VL chat template"
    # Qwen2.5-VL-Instruct's tokenizer_config: a turn ends with <|im_end|>, <|endoftext|> pads (without a
    # tokenizer_config.json, Qwen2Tokenizer would take <|endoftext|> as eos and stop TRL's samples at it only).
    processor.tokenizer.eos_token, processor.tokenizer.pad_token = IM_END, ENDOFTEXT
    return processor, how


def _trl_prompt(record, rgb):
    """The SIF prompt as TRL's conversational format (image placeholder filled by TRL from the ``image`` column)."""
    from engine.data.messages import sif_messages

    messages, _ = sif_messages(record, False, rgb, None)
    return messages


def _check_same_inputs(processor, record, rgb, pil, checkpoint: Path) -> None:
    """TRL's processor must give our token ids and pixel values for the same prompt (else it is not a comparison)."""
    import torch

    from engine.models import processor_from_pretrained
    from engine.rl.prompts import build_prompt

    ours = build_prompt(record, processor_from_pretrained(checkpoint), with_depth=False).inputs
    messages = _trl_prompt(record, rgb)
    for part in messages[0]["content"]:
        if part["type"] == "image":
            part["image"] = pil
    hf = processor.apply_chat_template(
        [messages], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    if not torch.equal(hf["input_ids"][0], ours["input_ids"]):
        raise SystemExit("TRL's processor tokenises the SIF prompt differently from ours")
    if not torch.equal(hf["image_grid_thw"], ours["image_grid_thw"]):
        raise SystemExit("TRL's processor gives another image grid than ours")
    diff = float((hf["pixel_values"] - ours["pixel_values"]).abs().max())
    if diff > 1e-5:
        raise SystemExit(f"TRL's processor gives other pixel values than ours (max diff {diff})")


def run_trl(args: argparse.Namespace) -> dict:
    """TRL's GRPOTrainer on the same checkpoint, records, rewards and hyper-parameters, timed per phase."""
    import datasets
    import torch
    import transformers
    import trl
    from PIL import Image

    from engine.data.images import load_image

    checkpoint = Path(args.checkpoint)
    records = _records(args.steps)
    processor, how = hf_processor(checkpoint)
    rgb0 = load_image(records[0].image)
    _check_same_inputs(processor, records[0], rgb0, Image.fromarray(rgb0.numpy()), checkpoint)

    dataset, config = _trl_dataset(records), _trl_config(args)
    clock = _PhaseClock()
    trainer = _timed_trainer_class(clock)(
        model=_trl_model(checkpoint, args.train_vision, torch.float32),
        reward_funcs=[_sif_reward(records)],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[_step_timer(clock)],
    )
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    for s, r in zip(clock.steps, rewards):
        s["reward_mean"] = float(r)
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}
    return {"side": "trl", "steps": clock.steps, "processor": how, "versions": versions}


def _trl_dataset(records):
    """One row per record: TRL's conversational prompt, the PIL image and the record id (for the reward)."""
    import datasets
    from PIL import Image

    from engine.data.images import load_image

    rows = []
    for r in records:
        rgb = load_image(r.image)
        rows.append({"prompt": _trl_prompt(r, rgb), "image": Image.fromarray(rgb.numpy()), "record_id": r.id})
    return datasets.Dataset.from_list(rows)


def _sif_reward(records):
    """A TRL reward function: engine.rl.rewards.score_completions' total, as our batch source computes it (targets
    built here, as ours builds them per step while preparing the prompt)."""
    from engine.data.messages import record_depth
    from engine.rl.prompts import reward_target
    from engine.rl.rewards import AnswerProgress, RewardWeights, score_completions

    by_id = {r.id: r for r in records}
    progress, weights = AnswerProgress(), RewardWeights()

    def sif_reward(prompts, completions, record_id, **kwargs):
        texts = []
        for c in completions:
            content = c[-1]["content"] if isinstance(c, list) else c
            if isinstance(content, list):
                content = "".join(part.get("text") or "" for part in content)
            texts.append(content)
        ids = list(dict.fromkeys(record_id))
        targets = [reward_target(by_id[i], record_depth(by_id[i])) for i in ids]
        out = score_completions(texts, [ids.index(i) for i in record_id], targets, weights=weights, progress=progress)
        return out.total.tolist()

    return sif_reward


class _PhaseClock:
    """Wall and CPU seconds per TRL phase within the current step, and the finished steps' rows."""

    def __init__(self) -> None:
        self.phase: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []

    def timed(self, name, fn, *a, **k):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            self.phase[name] += time.perf_counter() - start
            self.phase[f"{name}_cpu"] += time.process_time() - cpu

    def close_step(self, inner: float, inner_cpu: float) -> None:
        """Record one step (``inner``: the Trainer's step without the batch fetch) in our phase names."""
        phase = self.phase
        inside = phase["tokenize"] + phase["rollout"] + phase["reward"] + phase["reference"]
        self.steps.append(
            {
                "data": phase["fetch"] + phase["tokenize"],
                "rollout": phase["rollout"],
                "reward": phase["reward"],
                "reference": phase["reference"],
                "other": phase["prepare"] - inside,
                "update": inner - phase["prepare"],
                "step": inner + phase["fetch"],
                "cpu": inner_cpu + phase["fetch_cpu"],
                "completion_tokens": phase["completion_tokens"],
            }
        )
        phase.clear()


def _timed_trainer_class(clock: _PhaseClock):
    """GRPOTrainer with its phases (fetch, tokenize, rollout, reward, reference, prepare) timed into ``clock``."""
    import torch
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def get_batch_samples(self, *a, **k):
            return clock.timed("fetch", super().get_batch_samples, *a, **k)

        def _tokenize_prompts(self, *a, **k):
            return clock.timed("tokenize", super()._tokenize_prompts, *a, **k)

        def _generate_single_turn(self, *a, **k):
            completion_ids, logprobs = clock.timed("rollout", super()._generate_single_turn, *a, **k)
            clock.phase["completion_tokens"] += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *a, **k):
            return clock.timed("reward", super()._calculate_rewards, *a, **k)

        def _get_per_token_logps_and_entropies(self, *a, **k):
            if torch.is_grad_enabled():
                return super()._get_per_token_logps_and_entropies(*a, **k)
            return clock.timed("reference", super()._get_per_token_logps_and_entropies, *a, **k)

        def _prepare_inputs(self, *a, **k):
            return clock.timed("prepare", super()._prepare_inputs, *a, **k)

    return TimedGRPOTrainer


def _step_timer(clock: _PhaseClock):
    """A TrainerCallback closing each step in ``clock``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = cpu = 0.0

        def on_step_begin(self, args_, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kwargs):
            clock.close_step(time.perf_counter() - self.start, time.process_time() - self.cpu)

    return StepTimer()


def _trl_config(args: argparse.Namespace):
    """TRL's GRPOConfig with our run's hyper-parameters (CPU, fp32, one update per batch, constant LR)."""
    from trl import GRPOConfig

    L = args.max_completion
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_compare_trl_"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.num_generations,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=L,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=0.2,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        shuffle_dataset=False,
        seed=args.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        generation_kwargs=None if args.natural_length else {"min_new_tokens": L},
    )


def _trl_model(checkpoint: Path, train_vision: bool, dtype):
    """The HF model of ``checkpoint``, with our sampler's stop tokens and our vision-tower freezing."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.models import processor_from_pretrained

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    # Qwen2.5-VL-Instruct's generation_config: both <|im_end|> and <|endoftext|> end a sample, as in our sampler.
    model.generation_config.eos_token_id = list(processor_from_pretrained(checkpoint).tokenizer.eos_token_ids)
    for p in model.model.visual.parameters():  # as ours: the vision tower frozen unless --train-vision
        p.requires_grad_(train_vision)
    return model


# ---------------------------------------------------------------------------------------------------------------
# driver


def _child(side: str, argv: list[str]) -> dict:
    """One run of one side in a fresh process; adds its wall time, the cores it kept busy on average (CPU time /
    wall: about the thread count on an idle machine, less when other jobs compete) and the load average around it."""
    cmd = [sys.executable, "-m", "benchmarks.trl_compare", *argv, "--side", side]
    load_before, usage_before = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    result.update(wall_s=wall, cores_busy=cpu / wall, loadavg_before=load_before, loadavg_after=os.getloadavg())
    return result


def _summary(side: str, steps: list[dict]) -> dict:
    med = lambda k: statistics.median(s[k] for s in steps)
    row = {"side": side, "steps": len(steps), "completion_tokens": med("completion_tokens")}
    row.update({f"{ph}_s": med(ph) for ph in PHASES})
    row["step_s"] = med("step")
    row["cpu_s"] = med("cpu")
    row["rollout_tok_s"] = statistics.median(s["completion_tokens"] / max(s["rollout"], 1e-9) for s in steps)
    row["ms_per_token"] = statistics.median(1e3 * s["step"] / max(s["completion_tokens"], 1) for s in steps)
    return row


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.side is not None:  # child: one run of one side, JSON on the last stdout line
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        print(json.dumps(result), flush=True)
        return result
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    child_argv = list(argv)
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    extra: dict = {}
    started = time.perf_counter()
    for k in range(args.rounds):
        for side in ("ours", "trl"):
            result = _child(side, child_argv)
            runs[side].append(result)
            if side == "trl":
                extra = {"processor": result["processor"], "versions": result["versions"]}
            print(
                f"[trl_compare] round {k + 1}/{args.rounds} {side}: {result['wall_s']:.0f} s, "
                f"{result['cores_busy']:.2f} cores busy, load {result['loadavg_before'][0]:.2f} -> "
                f"{result['loadavg_after'][0]:.2f}",
                flush=True,
            )
    measured = {side: [s for r in rs for s in r["steps"][args.warmup :]] for side, rs in runs.items()}
    rows = [_summary("ours", measured["ours"]), _summary("TRL", measured["trl"])]
    ratio = {
        "step": rows[1]["step_s"] / rows[0]["step_s"],
        "per_token": rows[1]["ms_per_token"] / rows[0]["ms_per_token"],
        "rollout": rows[1]["rollout_s"] / rows[0]["rollout_s"],
        "update": rows[1]["update_s"] / rows[0]["update_s"],
        "cpu": rows[1]["cpu_s"] / rows[0]["cpu_s"],
    }
    rows.append({"side": "TRL / ours", **{f"{k}_s": v for k, v in ratio.items() if k != "per_token"}})
    rows[-1]["ms_per_token"] = ratio["per_token"]
    columns = [
        ("side", "side"), ("completion_tokens", "compl. tok/step"), ("data_s", "data s"), ("rollout_s", "rollout s"),
        ("reward_s", "reward s"), ("reference_s", "ref s"), ("other_s", "other s"), ("update_s", "update s"),
        ("step_s", "step s"), ("cpu_s", "step CPU s"), ("rollout_tok_s", "rollout tok/s"),
        ("ms_per_token", "step ms / compl. tok"),
    ]  # fmt: skip
    length = "natural lengths" if args.natural_length else f"every completion forced to {args.max_completion} tokens"
    length += ", vision tower trained" if args.train_vision else ", vision tower frozen"
    print(
        f"GRPO step, ours vs TRL {extra['versions']['trl']} GRPOTrainer, CPU ({torch.get_num_threads()} threads), "
        f"1 prompt x G={args.num_generations}, {length}; median of {len(measured['ours'])} steps per side "
        f"({args.rounds} interleaved runs x {args.steps - args.warmup} steps after {args.warmup} warm-up)"
    )
    print(markdown_table(rows, columns))
    print(
        f"TRL / ours: step {ratio['step']:.2f}x, per completion token {ratio['per_token']:.2f}x, "
        f"step CPU time {ratio['cpu']:.2f}x"
    )
    payload = {
        "environment": {**environment("cpu"), **extra.get("versions", {}), "threads": torch.get_num_threads()},
        "args": {k: v for k, v in vars(args).items() if k != "side"},
        "trl_processor": extra.get("processor"),
        "result": rows,
        "ratio": ratio,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
