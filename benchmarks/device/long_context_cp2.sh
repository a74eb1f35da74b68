#!/usr/bin/env bash
# Context parallelism over 2 GPUs beside torchtitan's, the 1B shape, one part per device call (each fits in 600 s):
#   32k        cp2 at seq 32k (mb 1 × ga 4), torchtitan cp2 on the same shape, and one GPU without cp on the same
#              batches for the loss check;
#   128k       the same at seq 131072 under full checkpointing (ga 1), ours with --memory-peak;
#   documents  cp2 at 32k on rows of packed ~4k-token documents under per-document masks, then causal rows.
# Run from the repository root on an nvidia-h200-x2 machine with `carry: [".whl", ".tt"]` (built here first by
# benchmarks/device/prepare-wheels.sh and the torchtitan kit's prepare.sh, which fills .tt/):
#   bash benchmarks/device/long_context_cp2.sh 32k
# Each run's JSON lands in $OUT under the part's name; compare ratios only within one call.
set -uo pipefail
part=${1:?usage: long_context_cp2.sh 32k|128k|documents}
OURS_TIMEOUT=${OURS_TIMEOUT:-240}
source "$(dirname "$0")/common.sh"

case $part in
32k)
    fast=(--micro-batch-size 1 --seq-len 32768 --grad-accum 4 --steps 3 --repeats 3 --warmup 3)
    ours cp2_32k 2 "${fast[@]}" --runs native-zero1-cp2
    TT_TAG=cp2_32k bash .tt/run.sh 1b 2 --parallelism.context_parallel_degree 2 --training.seq_len 32768 \
        --training.local_batch_size 1 --training.global_batch_size 4 --training.steps 12 --metrics.log_freq 2
    ours 1gpu_32k 1 "${fast[@]}" --runs native-zero1
    ;;
128k)
    long=(--micro-batch-size 1 --seq-len 131072 --grad-accum 1 --steps 2 --repeats 2 --warmup 2)
    ours cp2_128k 2 "${long[@]}" --runs native-zero1-cp2-acfull --memory-peak
    TT_TAG=cp2_128k bash .tt/run.sh 1b 2 --parallelism.context_parallel_degree 2 --training.seq_len 131072 \
        --training.local_batch_size 1 --training.global_batch_size 1 --training.steps 8 --metrics.log_freq 2 \
        --activation_checkpoint.mode full
    ours 1gpu_128k 1 "${long[@]}" --runs native-zero1-acfull
    ;;
documents)
    fast=(--micro-batch-size 1 --seq-len 32768 --grad-accum 4 --steps 3 --repeats 3 --warmup 3 --runs native-zero1-cp2)
    ours cp2_32k_documents 2 "${fast[@]}" --doc-tokens 4096
    ours cp2_32k_causal 2 "${fast[@]}"
    ;;
*)
    echo "long_context_cp2.sh: part must be 32k, 128k or documents, not '$part'" >&2
    exit 2
    ;;
esac
ls -l "$OUT"
