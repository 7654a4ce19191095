#!/usr/bin/env bash
# The GPU pass on a CUDA machine: build the CUDA extension, run the gpu-marked tests and the
# benchmarks, and write the JSON + one report.md into DEST (default benchmarks/results/<date>-<gpu>-<commit>/).
#
#   bash benchmarks/run_gpu.sh [DEST] [STEP...]    STEP: build tests kernels sweep grpo crop crop-v2 e2e model
#                                                    train compile profile decode-async (default: all)
#
# grpo (issue 17): grpo_loss_from_logits impl="two_pass" (default) / "one_pass" / "fused" beside Liger's
# triton_grpo_loss and the copy bound, both importance levels, N = 8192, then the launch sweep of the new
# kernels (kernels/grpo_logits.py); the default impl switches only after this step shows the winner.
#
# decode-async (issue 17): one rollout of the 0.5B model at 64 rows (8 prompts x 8 samples) with the lockstep
# decode (graph) and with the step launched ahead of the host's bookkeeping (graph_async), random samples and
# scripted crop-mode traces (real splices); each prints its step time beside its GPU time per step.
#
# Each step runs under its own time limit, so one that hangs costs its limit and the rest still run.
# SIF_DECODE (graph | graph_async | static | eager, default graph) picks the rollout decode of the profile and
# train steps.
# liger-kernel is not on the device machine: carry its wheel (README, "GPU"). DALI is too large to carry, so its
# `mixed` decode test skips there and decode.py (PIL vs DALI) is not part of this pass.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
# The commit measured: pass SIF_COMMIT where the tree's .git may be missing or stale (a copied work tree).
export SIF_COMMIT=${SIF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
dest=${1:-benchmarks/results/$(date -u +%Y-%m-%d)-${gpu}-${SIF_COMMIT}}
shift || true
steps=${*:-build tests kernels sweep grpo crop crop-v2 e2e model train compile profile decode-async}
decode=${SIF_DECODE:-graph}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
report="$dest/report.md"  # every table and the test summary in one file
{ echo "# $gpu, $(date -u +%F), commit $SIF_COMMIT, steps: $steps, decode: $decode"; nvidia-smi -L; } >> "$report"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, output into the report, say how it ended
    local name=$1 limit=$2
    shift 2
    echo -e "\n## $name\n" | tee -a "$report"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$report"
    local rc=${PIPESTATUS[0]}
    echo "[$name: rc $rc, $((SECONDS - t0)) s]" | tee -a "$report"
}

for s in $steps; do
    case $s in
        build) step build 300 env SIF_CUDA_ARCH="${SIF_CUDA_ARCH:-9.0}" MAX_JOBS=8 python setup.py -q build_ext --inplace ;;
        tests) step tests 240 python -m pytest -q -m gpu tests -rs ;;
        kernels) step kernels 240 python -m benchmarks.kernels --device cuda --no-compile --out "$dest/kernels.json" ;;
        sweep) step sweep 180 python -m benchmarks.kernels --device cuda --sweep --out "$dest/kernels_sweep.json" ;;
        grpo)
            step grpo-tests 120 python -m pytest -q tests/test_kernels_grpo_logits.py -rs
            step grpo 180 python -m benchmarks.kernels --device cuda --no-compile --sizes 8192 --ops grpo_from_logits \
                --grpo-levels token sequence --out "$dest/kernels_grpo.json"
            step grpo-sweep 300 python -m benchmarks.kernels --device cuda --sweep-grpo --out "$dest/kernels_grpo_sweep.json" ;;
        crop) step crop 120 python -m benchmarks.crop_boxes --device cuda --out "$dest/crop_boxes.json" ;;
        e2e)
            step e2e 300 torchrun --nproc_per_node=1 recipes/grpo_sif.py --train.output_dir /tmp/sif-e2e \
                --sft.train.output_dir /tmp/sif-e2e --sft.train.max_steps 300 --train.max_steps 8 --train.checkpoint_every 4 --rl.focus_mode crop
            step eval 120 python recipes/eval_sif.py --model.path /tmp/sif-e2e/grpo-tiny/hf --data.limit 16 \
                --eval.focus_mode crop --eval.output /tmp/sif-e2e/eval
            for f in metrics.jsonl probe.json curves.png; do cp /tmp/sif-e2e/grpo-tiny/$f "$dest/e2e-$f"; done ;;
        model) step model 180 python -m benchmarks.model --device cuda --out "$dest/model.json" ;;
        train)
            step train 240 python -m benchmarks.train_step --size 0.5b --device cuda --prompts 8 \
                --num-generations 8 --max-completion 256 --steps 4 --peak-tflops 989 --decode "$decode" \
                --out /tmp/sif-train/train_step.json
            cp /tmp/sif-train/train_step.json "$dest/" ;;
        compile) step compile 240 python -m benchmarks.kernels --device cuda --compile --sizes 8192 \
            --ops token_logprobs grpo_from_logits --out "$dest/kernels_compile.json" ;;
        profile) step profile 180 python -m benchmarks.profile_rollout --device cuda --size 0.5b --prompts 8 \
            --num-generations 8 --max-completion 64 --decode "$decode" --work /tmp/sif-train ;;
        decode-async)
            for d in graph graph_async; do
                step "decode-$d" 180 python -m benchmarks.profile_rollout --device cuda --size 0.5b --prompts 8 \
                    --num-generations 8 --max-completion 64 --decode "$d" --timing-runs 3 --rows 8 --work /tmp/sif-train
                step "decode-$d-crop" 180 python -m benchmarks.profile_rollout --device cuda --size 0.5b --prompts 8 \
                    --num-generations 8 --max-completion 256 --mode crop --script traces --decode "$d" --timing-runs 3 \
                    --rows 8 --work /tmp/sif-train
            done ;;
        *) echo "unknown step $s" >&2; exit 2 ;;
    esac
done
echo "results in $dest"
