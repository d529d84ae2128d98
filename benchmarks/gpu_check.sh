#!/usr/bin/env bash
# One script for a CUDA machine: build, run the kernel + decoder tests on the GPU, time the kernels.
# Usage (repo root): bash benchmarks/gpu_check.sh      -> prints a timing table last.
set -uo pipefail
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/laser-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
# the installed package (not the source tree) so laser._C is the freshly built extension
cd tests && python3 -m pytest -q -x -p no:cacheprovider test_kernels.py test_decode.py test_batch.py test_pool.py 2>&1 | tee "$OUT/tests.log" | tail -15
cd ..
python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench.log"
