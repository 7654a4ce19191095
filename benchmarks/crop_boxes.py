"""crop_boxes throughput: the native op vs a Python loop (slice + F.interpolate per box) and, when torchvision is
importable, torchvision.ops.roi_align.

Workload (issue 3): 8 uint8 images of 1024 x 1024 (HWC, as decoded) with float32 depth maps, K = 64 / 256 / 1024
boxes with integer corners and side lengths uniform in [32, 1024] (fixed seed), each resized to 448 x 448,
scaled to [0, 1] and normalised with the CLIP mean/std, depth resampled the same way, plus per-box depth
statistics (median, mean, min). Every method produces the same outputs:

- ``native``: ``engine.ops.crop_boxes`` (one call for all boxes), with the default CUDA kernels (v1).
- ``native-v2`` (CUDA, only with ``--methods ... native-v2``): the same op with ``SIF_CROP_BOXES_KERNEL=v2``, the
  kernels rewritten for HBM bandwidth (csrc/cuda/crop_boxes_cuda.cu; opt-in until a GPU pass validates them).
- ``loop``: per box, slice the region, ``float() / 255``, ``F.interpolate(bilinear, align_corners=False)``,
  normalise, the same for depth, ``median/mean/min`` of the depth region, written into preallocated outputs.
- ``roi_align``: ``torchvision.ops.roi_align(aligned=True, sampling_ratio=2)`` on the float image and on depth
  (averages sample points per bin, so its values differ; stats still come from a loop) - a speed reference.

Timing: the fastest of ``--iters`` calls after one warm-up (on the CPU the loop is timed by its one call, which
also gives the outputs the others are compared with). GB/s counts the bytes of crops, depth crops and stats
written plus the source pixels read (each box's region of RGB uint8 and depth float32, once). On CUDA the table
also gives GB/s as a share of the HBM peak (datasheet, by device name, or ``--hbm-peak-gbs``) and of a measured
device-to-device copy (1 GiB, read + write): the target is >= 50 % of the HBM peak. On the CPU,
faulting in fresh output pages (~0.8 GB at K=256) costs as much as the crops themselves with 4 KiB pages: the
native op advises huge pages for its outputs; the loop's preallocated outputs get them only under torch's
``THP_MEM_ALLOC_ENABLE=1`` (stamped in the JSON). Prints a markdown table and writes JSON.

    python benchmarks/crop_boxes.py --device cpu --threads 2 --out benchmarks/out/crop_boxes_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, synchronize, write_json  # noqa: E402
from engine.ops import crop_boxes  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def best_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Fastest of `iters` timed calls after `warmup` untimed ones, in ms: on a shared CPU the minimum is the
    estimate least disturbed by other processes (the median of common.time_ms drifts with their load)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def make_problem(k: int, device: str, n: int = 8, size: int = 1024, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    depth = torch.rand((n, size, size), generator=g)
    wh = torch.randint(32, size + 1, (k, 2), generator=g)
    xy = (torch.rand((k, 2), generator=g) * (size - wh + 1)).long()
    boxes = torch.cat([xy, xy + wh], 1).float()
    index = torch.randint(0, n, (k,), generator=g)
    return {
        "images": images.to(device),
        "depth": depth.to(device),
        "boxes": boxes.to(device),
        "index": index.to(device),
        "box_list": boxes.long().tolist(),
        "index_list": index.tolist(),
    }


def run_native(p: dict, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = crop_boxes(p["images"], p["boxes"], p["index"], (out, out), depth=p["depth"], mean=MEAN, std=STD)
    return r.crops, r.depth_crops, r.depth_stats


def run_loop(p: dict, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, depth, dev = p["images"], p["depth"], p["images"].device
    k = len(p["box_list"])
    crops = torch.empty((k, 3, out, out), device=dev)
    depth_crops = torch.empty((k, 1, out, out), device=dev)
    stats = torch.empty((k, 3), device=dev)
    mean = torch.tensor(MEAN, device=dev).view(3, 1, 1)
    std = torch.tensor(STD, device=dev).view(3, 1, 1)
    for i, ((x1, y1, x2, y2), n) in enumerate(zip(p["box_list"], p["index_list"])):
        region = images[n, y1:y2, x1:x2].permute(2, 0, 1).float().div_(255.0)
        crop = F.interpolate(region[None], (out, out), mode="bilinear", align_corners=False)[0]
        crops[i] = (crop - mean) / std
        dregion = depth[n, y1:y2, x1:x2]
        depth_crops[i] = F.interpolate(dregion[None, None], (out, out), mode="bilinear", align_corners=False)[0]
        stats[i, 0], stats[i, 1], stats[i, 2] = dregion.median(), dregion.mean(), dregion.min()
    return crops, depth_crops, stats


def run_roi_align(p: dict, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchvision.ops import roi_align

    dev = p["images"].device
    rois = torch.cat([p["index"].float()[:, None], p["boxes"]], 1)
    chw = p["images"].permute(0, 3, 1, 2).float().div_(255.0)
    crops = roi_align(chw, rois, (out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    crops = (crops - torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    depth_crops = roi_align(p["depth"][:, None], rois, (out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    stats = torch.empty((len(p["box_list"]), 3), device=dev)
    for i, ((x1, y1, x2, y2), n) in enumerate(zip(p["box_list"], p["index_list"])):
        dregion = p["depth"][n, y1:y2, x1:x2]
        stats[i, 0], stats[i, 1], stats[i, 2] = dregion.median(), dregion.mean(), dregion.min()
    return crops, depth_crops, stats


# Datasheet HBM bandwidth in GB/s by device-name substring (first match wins).
HBM_PEAK_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def hbm_peak_gbs(override: float | None) -> float | None:
    """HBM peak GB/s to compare with: ``override`` if given, else this device's datasheet value (None: unknown)."""
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in HBM_PEAK_GBS.items() if key in name), None)


def copy_gbs() -> float:
    """Measured device copy bandwidth (bytes read + written per second, GB/s) of a 1 GiB tensor."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = best_ms(lambda: dst.copy_(src), "cuda", warmup=3, iters=20)
    return 2 * (1 << 30) / ms / 1e6


def run_native_v2(p: dict, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """run_native with the v2 CUDA kernels (the op reads SIF_CROP_BOXES_KERNEL at each call)."""
    previous = os.environ.get("SIF_CROP_BOXES_KERNEL")
    os.environ["SIF_CROP_BOXES_KERNEL"] = "v2"
    try:
        return run_native(p, out)
    finally:
        if previous is None:
            del os.environ["SIF_CROP_BOXES_KERNEL"]
        else:
            os.environ["SIF_CROP_BOXES_KERNEL"] = previous


def traffic_bytes(p: dict, out: int) -> int:
    k = len(p["box_list"])
    written = k * (3 + 1) * out * out * 4 + k * 3 * 4
    read = sum((x2 - x1) * (y2 - y1) * (3 + 4) for x1, y1, x2, y2 in p["box_list"])
    return written + read


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) if a[0].numel() else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the native op uses as many)")
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--out-size", type=int, default=448)
    parser.add_argument("--iters", type=int, default=None, help="timed calls per method (default: cpu 5, cuda 20)")
    parser.add_argument("--out", default="benchmarks/out/crop_boxes.json", help="JSON output path")
    parser.add_argument("--methods", nargs="+", help="only these methods (the loop always runs: it is the reference)")
    parser.add_argument("--hbm-peak-gbs", type=float, help="HBM peak GB/s (default: datasheet value by device name)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    iters = args.iters or (5 if args.device == "cpu" else 20)
    try:
        import torchvision.ops  # noqa: F401

        methods = {"native": run_native, "loop": run_loop, "roi_align": run_roi_align}
    except ImportError:
        methods = {"native": run_native, "loop": run_loop}
    if args.methods:  # native-v2 runs only when asked for: a fault in it must not cost the v1 numbers
        if args.device == "cuda":
            methods = {"native": run_native, "native-v2": run_native_v2, **methods}
        unknown = set(args.methods) - set(methods)
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted(methods)}")
        methods = {name: fn for name, fn in methods.items() if name in args.methods or name == "loop"}
    peak = hbm_peak_gbs(args.hbm_peak_gbs) if args.device == "cuda" else None
    copy = copy_gbs() if args.device == "cuda" else None

    rows = []
    for k in args.boxes:
        problem = make_problem(k, args.device)
        nbytes = traffic_bytes(problem, args.out_size)
        # The loop's first call is its timing on the CPU (seconds per call, so one call is stable) and the
        # outputs every method is compared with.
        start = time.perf_counter()
        reference = run_loop(problem, args.out_size)
        synchronize(args.device)
        times = {"loop": (time.perf_counter() - start) * 1e3}
        if args.device == "cuda":
            loop = functools.partial(run_loop, problem, args.out_size)
            times["loop"] = best_ms(loop, args.device, warmup=0, iters=iters)
        for name, fn in methods.items():
            diff = 0.0 if name == "loop" else max_diff(fn(problem, args.out_size), reference)
            if name != "loop":
                call = functools.partial(fn, problem, args.out_size)
                times[name] = best_ms(call, args.device, warmup=1, iters=iters)
            rows.append(
                {
                    "K": k,
                    "method": name,
                    "ms": times[name],
                    "GB/s": nbytes / times[name] / 1e6,
                    "max_abs_diff_vs_loop": diff,
                    "bytes": nbytes,
                    "speedup_vs_loop": times["loop"] / times[name],
                    "pct_hbm_peak": 100 * nbytes / times[name] / 1e6 / peak if peak else None,
                    "pct_copy": 100 * nbytes / times[name] / 1e6 / copy if copy else None,
                }
            )

    columns = [
        ("K", "K"),
        ("method", "method"),
        ("ms", "ms"),
        ("speedup_vs_loop", "speedup vs loop"),
        ("GB/s", "GB/s"),
        ("pct_hbm_peak", "% of HBM peak"),
        ("pct_copy", "% of copy"),
        ("diff", "max abs diff vs loop"),
    ]
    shown = [{**row, "diff": f"{row['max_abs_diff_vs_loop']:.1e}"} for row in rows]
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(
        f"crop_boxes: 8 x 1024^2 uint8 + depth -> {args.out_size}^2, device={args.device}, threads={args.threads}, "
        f"THP_MEM_ALLOC_ENABLE={thp}"
    )
    print(markdown_table(shown, columns))
    env = {**environment(args.device), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
    if args.device == "cuda":
        print(f"HBM peak {peak} GB/s (datasheet), measured copy {copy:.0f} GB/s")
    payload = {"env": env, "args": vars(args), "hbm_peak_gbs": peak, "copy_gbs": copy, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
