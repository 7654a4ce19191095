"""``python -m engine.models.create_tiny OUT [--seed S]``: write the random tiny default (weights of ``seed``, the
tiny tokenizer and processor) to ``OUT``, the start of ``python -m engine.train.vision_align`` and of the recipes'
tiny default before its alignment."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.models.tiny import create_tiny_checkpoint


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        prog="python -m engine.models.create_tiny", description="Write the random tiny default."
    )
    ap.add_argument("out", help="the checkpoint folder to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    path = create_tiny_checkpoint(args.out, seed=args.seed)
    print(f"[tiny] wrote {path}")
    return path


if __name__ == "__main__":
    main()
