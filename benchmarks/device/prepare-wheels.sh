#!/usr/bin/env bash
# Fill ./.whl with the wheels the GPU benchmarks need on a machine that cannot reach a package index and already has
# torch, pyarrow, prometheus_client, tokenizers, transformers, safetensors, numpy, pytest, hypothesis and ninja, but
# not deepspeed, pydantic or omegaconf. Run it from the repository's root on a machine with an index (`.whl/` is
# git-ignored), copy the tree over, and start there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Ray is left out (its wheel alone is about 79 MB): the GPU benchmarks start their ranks with torchrun.
set -euo pipefail
mkdir -p .whl
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl omegaconf==2.4.0 \
  hjson py-cpuinfo msgpack einops pydantic pydantic-core annotated-types typing-inspection
# DeepSpeed ships as an sdist: build a pure-Python wheel. Its ops are left out; they JIT-compile on the GPU machine,
# which has nvcc and ninja.
sdist=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary :all: -d "$sdist" deepspeed==0.19.8
python3 -m pip wheel -q --no-deps -w .whl "$sdist"/deepspeed-*.tar.gz
ls -la .whl
