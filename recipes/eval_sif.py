"""Evaluate a SIF model on a held-out split: accuracy by question type, grounding IoU, format and depth rates.

    python recipes/eval_sif.py --model.path runs/grpo-tiny/hf            # bundled held-out scenes
    torchrun --nproc_per_node=2 recipes/eval_sif.py --model.path runs/grpo-tiny/hf --eval.focus_mode crop
    python recipes/eval_sif.py --model.path /ckpt --data.eval_path /data/spatialbench/records.jsonl

The job is ``engine.recipes.eval_sif`` (its ``EvalRecipeConfig`` holds the defaults; ``--help`` lists every key).
"""

from engine.recipes.eval_sif import main

if __name__ == "__main__":
    main()
