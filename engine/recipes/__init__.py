"""The SIF jobs behind ``recipes/*.py``, one module per job, and what they share.

``sft_sif`` (SFT on SIF traces), ``grpo_sif`` (the SFT warm-up when needed, then GRPO-SIF), ``eval_sif`` (the
held-out evaluation); each has a config dataclass with the job's defaults, ``main(argv)`` (load the config, run
in a process group) and ``run(cfg, env)``. Shared: ``policy`` (checkpoint, model, reference, export hook),
``splits`` (records), ``summary`` (first-vs-last means).
"""
