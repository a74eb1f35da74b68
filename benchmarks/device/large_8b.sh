#!/usr/bin/env bash
# The Llama-3-8B shape (examples/llama-8b.yaml, seq 4096) over 2 GPUs beside torchtitan, one part per device call
# (each fits in 600 s):
#   selective  FSDP dp2 ZeRO-3 at micro-batch 2 × accumulation 4: ours without checkpointing, selective, and
#              selective with the block inputs offloaded, then torchtitan's per-op selective on the same batch;
#   tp2        tp2 with sequence parallelism (the compiled vocabulary-parallel loss) and FSDP dp2 with selective
#              checkpointing, micro-batch 1 × accumulation 8, as the spec writes them;
#   pp2        pp2 under 1F1B and interleaved 1F1B (two stages a rank), each with its measured bubble.
# Run from the repository root on an nvidia-h200-x2 machine with `carry: [".whl", ".tt"]` (built here first by
# benchmarks/device/prepare-wheels.sh and the torchtitan kit's prepare.sh, which fills .tt/):
#   bash benchmarks/device/large_8b.sh selective
# Each run's JSON lands in $OUT under the part's name; compare ratios only within one call.
set -uo pipefail
part=${1:?usage: large_8b.sh selective|tp2|pp2}
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

# ours NAME ARGS...: one gpu_backends.py launch on 2 GPUs, its JSON kept as gpu_backends_NAME.json
ours() {
    local name=$1
    shift
    timeout "${OURS_TIMEOUT:-360}" torchrun --nproc_per_node 2 benchmarks/gpu_backends.py \
        --model examples/llama-8b.yaml --seq-len 4096 "$@"
    mv "$OUT/gpu_backends_2gpu.json" "$OUT/gpu_backends_$name.json" 2>/dev/null || echo "$name: no result"
}

case $part in
selective)
    ours 8b_mb2_ac --micro-batch-size 2 --grad-accum 4 --steps 2 --repeats 2 --warmup 2 --memory-peak \
        --runs native-zero3-acnone,native-zero3-acselective,native-zero3-acselective-offload
    TT_TAG=selective_mb2 TT_TIMEOUT=200 bash .tt/run.sh 8b 2 --activation_checkpoint.mode selective \
        --activation_checkpoint.selective_ac_option op --training.local_batch_size 2 \
        --training.global_batch_size 16 --training.steps 8 --metrics.log_freq 2
    ;;
tp2)
    ours 8b_tp2 --micro-batch-size 1 --grad-accum 8 --steps 3 --repeats 2 --warmup 2 \
        --runs native-zero1-tp2,native-zero3-acselective
    ;;
pp2)
    ours 8b_pp2 --micro-batch-size 1 --grad-accum 8 --steps 3 --repeats 2 --warmup 2 \
        --runs native-zero1-pp2-1f1b,native-zero1-pp2-interleaved
    ;;
*)
    echo "large_8b.sh: part must be selective, tp2 or pp2, not '$part'" >&2
    exit 2
    ;;
esac
ls -l "$OUT"
