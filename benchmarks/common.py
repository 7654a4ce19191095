"""Small shared helpers for the benchmarks: timing, peak memory, environment stamp, markdown tables, JSON output,
and the 0.5B-class model shape with a random checkpoint of it.

Peak memory on CUDA comes from the caching allocator's counters; on CPU from the peak RSS (VmHWM) of a fresh
subprocess per measurement (``measure_in_subprocess``), so one measurement's high-water mark cannot leak into
the next and no tracing allocator slows the op down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.distributed import DistEnv
from engine.models import ModelConfig, TextConfig, VisionConfig
from engine.models.tiny import create_tiny_checkpoint, tiny_config

MIB = 1024.0 * 1024.0


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of fn() in milliseconds (CUDA: synchronised around each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cuda_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during fn() beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def rss_peak_mib() -> float:
    """Peak resident set size of this process image in MiB: VmHWM from /proc (reset by exec, unlike ru_maxrss,
    which a subprocess inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_in_subprocess(argv: Sequence[str], timeout: float = 600.0) -> dict:
    """Run ``python <argv>`` and return the JSON object printed on its last stdout line."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {argv} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commit_id() -> str:
    """The commit being measured: ``SIF_COMMIT`` when set (a copied work tree's ``.git`` can be missing or
    stale), else ``git rev-parse --short HEAD``, else "unknown"."""
    if os.environ.get("SIF_COMMIT"):
        return os.environ["SIF_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def environment(device: str) -> dict:
    """Device, library versions, commit and UTC time to stamp a results file with."""
    commit = commit_id()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    env = {
        "device": name,
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header). Floats print with 2 decimals, None as an en dash."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            fmt(row.get(k)) if isinstance(row.get(k), float) or row.get(k) is None else str(row[k]) for k, _ in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(headers: tuple[str, str], rows: Sequence[tuple[str, str, Sequence[tuple[int, float]], float]]) -> str:
    """Learning curves as a markdown table: one line per ``(label, label, [(step, accuracy)], seconds)``, one column
    per step of the first curve."""
    steps = [s for s, _ in rows[0][2]]
    lines = [f"| {headers[0]} | {headers[1]} | " + " | ".join(str(s) for s in steps) + " | seconds |"]
    lines.append("|---|---|" + "---|" * (len(steps) + 1))
    for a, b, curve, seconds in rows:
        lines.append(f"| {a} | {b} | " + " | ".join(f"{acc:.2f}" for _, acc in curve) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def config_05b() -> ModelConfig:
    """Qwen2.5-0.5B decoder (tied, vocab 151936) + a 4-block ViT of Qwen2.5-VL width (1280)."""
    text = TextConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        mrope_section=[8, 12, 12],
    )
    vision = VisionConfig(depth=4, out_hidden_size=896, fullatt_block_indexes=[3])
    return ModelConfig(text=text, vision=vision, tie_word_embeddings=True)


SPECIAL_TOKEN_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "bos_token_id",
    "eos_token_id",
)


def random_checkpoint(folder: str | Path, size: str, env: DistEnv, seed: int = 0) -> Path:
    """``folder/random_<size>``: a checkpoint with random weights of ``size`` ("tiny" or "0.5b") and the tiny
    tokenizer/processor, written once by rank 0 (an existing one is reused) while the other ranks wait.

    The 0.5B-class model keeps Qwen's 151936-row vocabulary (so the head and loss cost what they cost at scale)
    and takes its special-token ids from the tiny tokenizer; ids the tokenizer does not know decode to nothing.
    """
    if size not in ("tiny", "0.5b"):
        raise ValueError(f"size {size!r}: expected 'tiny' or '0.5b'")
    path = Path(folder) / f"random_{size}"
    if env.is_main and not (path / "config.json").is_file():
        config = None
        if size == "0.5b":
            tiny = tiny_config()
            config = dataclasses.replace(config_05b(), **{name: getattr(tiny, name) for name in SPECIAL_TOKEN_FIELDS})
        create_tiny_checkpoint(path, seed, config)
    env.barrier()
    return path
