#!/usr/bin/env bash
# The Llama-3-8B shape (examples/llama-8b.yaml, seq 4096) beside torchtitan, one part per device call (each fits in
# 600 s). On an nvidia-h200-x2 machine:
#   selective  FSDP dp2 ZeRO-3 at micro-batch 2 × accumulation 4: ours without checkpointing, selective, and
#              selective with the block inputs offloaded, then torchtitan's per-op selective on the same batch;
#   tp2        tp2 with sequence parallelism (the compiled vocabulary-parallel loss) and FSDP dp2 with selective
#              checkpointing, micro-batch 1 × accumulation 8, as the spec writes them;
#   pp2        pp2 under 1F1B and interleaved 1F1B (two stages a rank), each with its measured bubble;
#   zerobubble pp2 under interleaved 1F1B and zero-bubble, both eager (zero-bubble's split backward is not compiled).
# On an nvidia-h200-x4 machine, where torchtitan trains tp and pp in bf16 (under FSDP over dp 2):
#   dp2-tp2    FSDP dp2 × tp2 with sequence parallelism, ours then torchtitan's;
#   dp2-pp2    FSDP dp2 × pp2 under 1F1B, 8 micro-batches of one sequence, ours then torchtitan's.
# On an nvidia-h200-x8 machine:
#   dp2-pp2-tp2  FSDP dp2 × pp2 × tp2, ours then torchtitan's.
# Run from the repository root with `carry: [".whl", ".tt"]` (built here first by
# benchmarks/device/prepare-wheels.sh and the torchtitan kit's prepare.sh, which fills .tt/):
#   bash benchmarks/device/large_8b.sh selective
# Each run's JSON lands in $OUT under the part's name; compare ratios only within one call.
set -uo pipefail
part=${1:?usage: large_8b.sh selective|tp2|pp2|zerobubble|dp2-tp2|dp2-pp2|dp2-pp2-tp2}
OURS_TIMEOUT=${OURS_TIMEOUT:-360}
source "$(dirname "$0")/common.sh"
shape=(--model examples/llama-8b.yaml --seq-len 4096)

# torchtitan TAG GPUS FLAGS...: its run of the same shape with the spec's per-op selective checkpointing
torchtitan() {
    local tag=$1 gpus=$2
    shift 2
    TT_TAG=$tag TT_TIMEOUT=${TT_TIMEOUT:-240} bash .tt/run.sh 8b "$gpus" --activation_checkpoint.mode selective \
        --activation_checkpoint.selective_ac_option op "$@"
}

steady=("${shape[@]}" --micro-batch-size 1 --grad-accum 8 --steps 3 --repeats 2 --warmup 2)
case $part in
selective)
    ours 8b_mb2_ac 2 "${shape[@]}" --micro-batch-size 2 --grad-accum 4 --steps 2 --repeats 2 --warmup 2 --memory-peak \
        --runs native-zero3-acnone,native-zero3-acselective,native-zero3-acselective-offload
    TT_TIMEOUT=200 torchtitan selective_mb2 2 --training.local_batch_size 2 --training.global_batch_size 16 \
        --training.steps 8 --metrics.log_freq 2
    ;;
tp2)
    ours 8b_tp2 2 "${steady[@]}" --runs native-zero1-tp2,native-zero3-acselective
    ;;
pp2)
    ours 8b_pp2 2 "${steady[@]}" --runs native-zero1-pp2-1f1b,native-zero1-pp2-interleaved
    ;;
zerobubble)
    ours 8b_pp2_zerobubble 2 "${steady[@]}" --no-compile --runs native-zero1-pp2-interleaved,native-zero1-pp2-zerobubble
    ;;
dp2-tp2)
    ours 8b_dp2_tp2 4 "${steady[@]}" --runs native-zero3-tp2
    torchtitan dp2_tp2 4 --parallelism.tensor_parallel_degree 2 --training.steps 10 --metrics.log_freq 2
    ;;
dp2-pp2)
    ours 8b_dp2_pp2 4 "${steady[@]}" --runs native-zero3-pp2-1f1b
    torchtitan dp2_pp2 4 --parallelism.pipeline_parallel_degree 2 --parallelism.pipeline_parallel_schedule 1F1B \
        --training.local_batch_size 8 --training.steps 10 --metrics.log_freq 2
    ;;
dp2-pp2-tp2)
    ours 8b_dp2_pp2_tp2 8 "${steady[@]}" --runs native-zero3-tp2-pp2-1f1b
    torchtitan dp2_pp2_tp2 8 --parallelism.tensor_parallel_degree 2 --parallelism.pipeline_parallel_degree 2 \
        --parallelism.pipeline_parallel_schedule 1F1B --training.local_batch_size 8 --training.steps 10 \
        --metrics.log_freq 2
    ;;
*)
    echo "large_8b.sh: part must be selective, tp2, pp2, zerobubble, dp2-tp2, dp2-pp2 or dp2-pp2-tp2, not '$part'" >&2
    exit 2
    ;;
esac
ls -l "$OUT"
