"""Model forward+backward throughput and peak memory on packed batches (tiny and 0.5B-class configs).

Each case builds a model from a config with random weights, packs ``batch`` sequences of ``seq`` tokens (each
with one image of ``image`` px², whose image tokens count towards ``seq``) and times ``forward_packed`` +
backward of a random projection of the hidden states. The lm_head/loss is excluded: the loss kernels own it.
tokens/s counts LLM tokens. Peak memory: CUDA max allocated on GPU; on CPU the process's peak RSS, each case
run in a fresh subprocess. MFU (GPU only) uses 6·N·tokens + causal attention FLOPs over the decoder and vision
tower, against the dense bf16 peak given by ``--peak-tflops`` (989 for H100 SXM).

    python benchmarks/model.py                 # CPU: tiny + 0.5B-class, short sequences
    python benchmarks/model.py --device cuda   # GPU: bf16, longer sequences, MFU
Writes a markdown table to stdout and JSON to benchmarks/out/model_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import config_05b  # noqa: E402
from engine.models import ModelConfig, VLModel, mrope_position_ids, tiny_config  # noqa: E402
from engine.models.tiny import init_weights  # noqa: E402

CASES = {
    "cpu": [("tiny", "tiny", 4, 256, 224), ("0.5B-class", "0.5b", 2, 128, 112)],
    "cuda": [("tiny", "tiny", 16, 1024, 224), ("0.5B-class", "0.5b", 8, 2048, 448)],
}


def make_batch(cfg: ModelConfig, batch: int, seq: int, image: int, device: torch.device):
    """Packed ids/positions/cu_seqlens + pixel values for ``batch`` sequences with one image each."""
    gen = torch.Generator().manual_seed(0)
    g = image // cfg.vision.patch_size
    n_img = g * g // cfg.vision.spatial_merge_size**2
    ids, pos, grids = [], [], []
    for _ in range(batch):
        text = torch.randint(0, 256, (seq - n_img - 2,), generator=gen)
        s = torch.cat(
            [
                text[:4],
                torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]),
                text[4:],
            ]
        )
        grid = torch.tensor([[1, g, g]])
        ids.append(s)
        pos.append(mrope_position_ids(s, grid, cfg))
        grids.append(grid)
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32)
    pv = torch.randn(batch * g * g, cfg.vision.patch_dim, generator=gen)
    return torch.cat(ids).to(device), torch.cat(pos, 1).to(device), cu.to(device), pv.to(device), torch.cat(grids)


def model_flops(cfg: ModelConfig, batch: int, seq: int, image: int) -> float:
    """Training FLOPs (fwd+bwd = 3× fwd) of the decoder (excl. embedding/head) and the vision tower."""
    t, v = cfg.text, cfg.vision
    kv = t.num_key_value_heads * t.head_dim
    dec_params = t.num_hidden_layers * (
        t.hidden_size * (t.hidden_size * 2 + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    )
    tokens = batch * seq
    dec_attn = t.num_hidden_layers * 2 * 2 * batch * seq * seq / 2 * t.num_attention_heads * t.head_dim
    patches = batch * (image // v.patch_size) ** 2
    vit_params = (
        v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size) + v.patch_dim * v.hidden_size
    )
    merge_in = v.hidden_size * v.spatial_merge_size**2
    merger = merge_in * (merge_in + v.out_hidden_size)
    vit_attn = v.depth * 2 * 2 * batch * ((image // v.patch_size) ** 2) ** 2 * v.hidden_size  # upper bound (full)
    fwd = 2 * dec_params * tokens + dec_attn + 2 * vit_params * patches + 2 * merger * patches / 4 + vit_attn
    return 3 * fwd


def run_case(
    name: str, kind: str, batch: int, seq: int, image: int, device: str, dtype: torch.dtype, steps: int, ckpt: bool
) -> dict:
    dev = torch.device(device)
    cfg = tiny_config() if kind == "tiny" else config_05b()
    with torch.device("meta"):
        model = VLModel(cfg)
    model = model.to_empty(device="cpu")
    init_weights(model, seed=0)
    model = model.to(device=dev, dtype=dtype).train()
    model.set_gradient_checkpointing(ckpt)
    ids, pos, cu, pv, grid = make_batch(cfg, batch, seq, image, dev)
    pv = pv.to(dtype)
    grad = torch.randn(batch * seq, cfg.text.hidden_size, device=dev, dtype=dtype)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden = model.forward_packed(ids, pos, cu, pv, grid)
        hidden.backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up allocators/kernels
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    step = sorted(times)[len(times) // 2]
    tokens = batch * seq
    out = {
        "case": name,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
        "image_px": image,
        "grad_ckpt": ckpt,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "step_s": round(step, 4),
        "tokens_per_s": round(tokens / step, 1),
    }
    if dev.type == "cuda":
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["tflops"] = round(model_flops(cfg, batch, seq, image) / step / 1e12, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--case", help="run one case in this process (internal)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/model_<device>.json)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        name, kind, b, s, im = next(c for c in CASES[args.device] if c[0] == args.case)
        print(json.dumps(run_case(name, kind, b, s, im, args.device, dtype, args.steps, args.grad_ckpt)))
        return
    rows = []
    for case in CASES[args.device]:
        cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--case", case[0]]
        cmd += ["--threads", str(args.threads)]
        if args.grad_ckpt:
            cmd.append("--grad-ckpt")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        if args.device == "cuda":
            row["mfu_pct"] = round(100 * row["tflops"] / args.peak_tflops, 1)
        rows.append(row)
    keys = [k for k in rows[0] if k not in ("device",)]
    print(f"| {' | '.join(keys)} |\n|{'---|' * len(keys)}")
    for r in rows:
        print(f"| {' | '.join(str(r.get(k, '')) for k in keys)} |")
    meta = {
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out or Path(__file__).parent / "out" / f"model_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
