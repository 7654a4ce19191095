"""GRPO-SIF: reinforce the SIF chain of thought with format, answer, grounding and depth rewards.

    python recipes/grpo_sif.py                        # tiny default: SFT warm-up, then GRPO-SIF, then a summary
    torchrun --nproc_per_node=2 recipes/grpo_sif.py   # the same on 2 processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 recipes/grpo_sif.py --config recipes/configs/grpo_qwen2_5_vl_7b.toml \\
        --model.path runs/sft-qwen7b/hf --data.path /data/sif50k/records.jsonl

The job is ``engine.recipes.grpo_sif`` (its ``GRPORecipeConfig`` holds the defaults; ``--help`` lists every key).
"""

from engine.recipes.grpo_sif import main

if __name__ == "__main__":
    main()
