#!/usr/bin/env bash
# One device call for this session's GPU checks: the GPU tests of the parts that changed (FP8 KV
# pages, the engine) and the FP8 throughput pair (zipage-2048 vs zipage-2048-fp8, Qwen3-8B shapes,
# the same 80 GiB of KV, 512 requests). Writes under $OUT (default benchmarks/results/).
#   bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -q -x -p no:cacheprovider ${TESTS:-tests/test_fp8_kernels.py \
  tests/test_fp8_engine.py tests/test_engine_gpu.py} 2>&1 | tee "$OUT/gpu_tests_session.log" | tail -6
python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 \
  --time-limit "${TIME_LIMIT:-75}" --systems "${SYSTEMS:-zipage-2048,zipage-2048-fp8}" \
  --out "$OUT/throughput_qwen3-8b_fp8_zipage.json" 2>&1 | tail -12
