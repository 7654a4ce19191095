"""SFT on SIF traces: teach the model the interleaved <area>/<text> chain of thought before GRPO-SIF.

    python recipes/sft_sif.py                                  # tiny embedded default on the bundled scenes
    torchrun --nproc_per_node=2 recipes/sft_sif.py --train.max_steps 50
    torchrun --nproc_per_node=8 recipes/sft_sif.py --config recipes/configs/sft_qwen2_5_vl_7b.toml \\
        --model.path /ckpt/Qwen2.5-VL-7B-Instruct --data.path /data/sif50k/records.jsonl

The job is ``engine.recipes.sft_sif`` (its ``SFTRecipeConfig`` holds the defaults; ``--help`` lists every key).
"""

from engine.recipes.sft_sif import main

if __name__ == "__main__":
    main()
