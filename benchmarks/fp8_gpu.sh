#!/usr/bin/env bash
# FP8 KV pages on the GPU, one device call per part (each fits a 10-minute call):
#   PART=tests  bash benchmarks/fp8_gpu.sh   # the FP8 kernels and engine against their references
#   PART=zipage bash benchmarks/fp8_gpu.sh   # zipage-2048 vs zipage-2048-fp8, same KV memory, 512 requests
#   PART=full   bash benchmarks/fp8_gpu.sh   # full KV: zipage-fullkv vs zipage-fullkv-fp8, same KV memory
# Qwen3-8B shapes (random weights), 80 GiB of KV for every system: at budget 2048 a bf16 request
# holds at most 9 pages of 256 tokens (~256 fit), an FP8 one half the bytes (~500 fit).
# Writes under $OUT (default benchmarks/results/).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
ARGS="--model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 --time-limit ${TIME_LIMIT:-120}"
case "${PART:-tests}" in
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_engine.py \
      tests/test_kernels_triton.py 2>&1 | tee "$OUT/gpu_tests_fp8.log" | tail -30 ;;
  zipage)
    python3 benchmarks/throughput.py $ARGS --systems zipage-2048,zipage-2048-fp8 \
      --out "$OUT/throughput_qwen3-8b_fp8_zipage.json" 2>&1 | tail -8 ;;
  full)
    python3 benchmarks/throughput.py $ARGS --systems zipage-fullkv,zipage-fullkv-fp8 \
      --out "$OUT/throughput_qwen3-8b_fp8_fullkv.json" 2>&1 | tail -8 ;;
  *) echo "PART must be tests, zipage or full" >&2; exit 2 ;;
esac
