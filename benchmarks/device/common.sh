# Sourced by the device scripts beside it: the project's wheels on the path, and `ours`.
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

# ours NAME GPUS ARGS...: one benchmarks/gpu_backends.py launch, stopped after OURS_TIMEOUT seconds (the sourcing
# script's default), its JSON kept as $OUT/gpu_backends_NAME.json
ours() {
    local name=$1 gpus=$2
    shift 2
    timeout "$OURS_TIMEOUT" torchrun --nproc_per_node "$gpus" benchmarks/gpu_backends.py "$@"
    mv "$OUT/gpu_backends_${gpus}gpu.json" "$OUT/gpu_backends_$name.json" 2>/dev/null || echo "$name: no result"
}
