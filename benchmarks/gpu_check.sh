#!/usr/bin/env bash
# One device call: install zipage (offline), run the GPU test suite, then the kernel benchmark.
# Usage on the GPU machine: bash benchmarks/gpu_check.sh   (writes under $OUT, or benchmarks/results/)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu_env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu -q -p no:cacheprovider ${TESTS:-tests/} ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/kernel_bench.py --out "$OUT/kernels.json" --plot "$OUT/kernels.png" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels.log" | tail -45
fi
