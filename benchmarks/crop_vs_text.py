"""Does crop mode earn its place? Held-out accuracy per question type of a text-mode and a crop-mode GRPO-SIF run.

Both runs are the GRPO recipe from the same start (the same checkpoint, data, seeds and step counts; each warms up
with the SFT of its own focusing mode), differing only in ``--rl.focus_mode``; each writes ``eval.json`` with its
SFT export and its trained policy scored on the same held-out split. This reads the two and prints them side by
side per question type beside the split's chance and majority answer, with the crop-minus-text accuracy of the
trained policies, and writes ``eval.json`` / ``eval.png`` of the four into ``--out``:

    torchrun --nproc_per_node=2 recipes/grpo_sif.py --rl.focus_mode text --train.run_name cvt-text \\
        --sft.train.run_name cvt-text-sft
    torchrun --nproc_per_node=2 recipes/grpo_sif.py --rl.focus_mode crop --train.run_name cvt-crop \\
        --sft.train.run_name cvt-crop-sft
    python -m benchmarks.crop_vs_text runs/cvt-text runs/cvt-crop --out benchmarks/results/DATE-crop-vs-text
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.rl.evaluation import report

TRAINED, START = "after GRPO", "SFT export"


def load_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """``{"SFT export": rows, "after GRPO": rows}`` from a GRPO run's ``eval.json`` (per-record rows)."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no eval.json (run the GRPO recipe with evaluate on, its default)")
    payload = json.loads(path.read_text())
    missing = [k for k in (START, TRAINED) if k not in payload]
    if missing:
        raise SystemExit(f"{path}: missing {missing}; found {sorted(payload)}")
    return {name: payload[name]["records"] for name in (START, TRAINED)}


def crop_gain(summaries: dict[str, dict]) -> dict[str, float]:
    """Per question type (and ``all``): accuracy of the crop-mode policy minus the text-mode one."""
    text, crop = summaries[f"text, {TRAINED}"], summaries[f"crop, {TRAINED}"]
    gain = {q: crop["by_qtype"][q]["accuracy"] - t["accuracy"] for q, t in text["by_qtype"].items()}
    gain["all"] = crop["accuracy"] - text["accuracy"]
    return gain


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text_run", help="the text-mode GRPO run folder (runs/<run_name>)")
    ap.add_argument("crop_run", help="the crop-mode GRPO run folder")
    ap.add_argument("--out", required=True, help="where eval.json and eval.png of the comparison go")
    args = ap.parse_args(argv)
    runs = {"text": load_run(args.text_run), "crop": load_run(args.crop_run)}
    ids = {mode: [r["id"] for r in rows[TRAINED]] for mode, rows in runs.items()}
    if ids["text"] != ids["crop"]:
        raise SystemExit("the two runs were evaluated on different held-out records; use the same data.eval_path")
    named = {f"{mode}, {stage}": rows[stage] for mode, rows in runs.items() for stage in (START, TRAINED)}
    summaries = report(named, args.out, f"held-out {len(ids['text'])} records, text vs crop mode")
    gain = crop_gain(summaries)
    print("[crop vs text] crop-mode accuracy minus text-mode accuracy after GRPO:")
    for q, g in gain.items():
        print(f"  {q:<15} {g:+.3f}")
    return gain


if __name__ == "__main__":
    main()
