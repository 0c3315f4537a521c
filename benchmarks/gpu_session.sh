#!/usr/bin/env bash
# One device call for a session's GPU checks (results under $OUT, default benchmarks/results/):
#   PART=fp8   the FP8 GPU tests and the FP8 throughput pair (zipage-2048 vs zipage-2048-fp8, Qwen3-8B
#              shapes, the same 80 GiB of KV, 512 requests)
#   PART=final the decode kernel on FP8 vs bf16 pages with launch variants, the GPU tests of FP8 and
#              sliding-window models, and `zipage bench/eval --model PATH` (benchmarks/model_gpu.sh;
#              carry .cache/issue16, made by `python benchmarks/make_model.py --assets .cache/issue16`)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
case "${PART:-final}" in
  fp8)
    timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_fp8_kernels.py \
      tests/test_fp8_engine.py tests/test_engine_gpu.py 2>&1 | tee "$OUT/gpu_tests_session.log" | tail -6
    python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 \
      --kv-gib 80 --time-limit "${TIME_LIMIT:-75}" --systems zipage-2048,zipage-2048-fp8 \
      --out "$OUT/throughput_qwen3-8b_fp8_zipage.json" 2>&1 | tail -12 ;;
  final)
    timeout 150 python3 benchmarks/fp8_decode_tune.py --out "$OUT/fp8_decode_tune.json" 2>&1 | tail -40
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py tests/test_sliding_engine.py \
      tests/test_kernels_window_sinks.py tests/test_views.py 2>&1 | tee "$OUT/gpu_tests_final.log" | tail -6
    OUT="$OUT/issue16" timeout 250 bash benchmarks/model_gpu.sh 2>&1 | tail -25 ;;
  *) echo "PART must be fp8 or final" >&2; exit 2 ;;
esac
