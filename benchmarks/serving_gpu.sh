#!/usr/bin/env bash
# The serving benchmark on one GPU: random-weight Qwen3-8B behind `zipage serve`'s app, zipage at
# budget 2048 against the same server with full KV, same KV memory, same Poisson arrivals.
#
# The GPU image lacks the server's packages: carry these wheels (the versions the CPU tests used)
# into a folder and point WHEELS at it (pure Python except pydantic-core: take the manylinux
# x86_64 wheel for the GPU's Python):
#   fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4
#   annotated-types==0.7.0 typing-inspection==0.4.2 annotated-doc==0.0.7 opentelemetry-api==1.45.2
#   h11==0.16.0 click==8.5.1
# (prometheus-client, httpx, anyio, typing-extensions and matplotlib are on the image already.)
#
# Usage (each call stays under ~10 minutes with the defaults; results under $OUT):
#   WHEELS=/path/to/wheels SYSTEMS=zipage bash benchmarks/serving_gpu.sh
#   WHEELS=/path/to/wheels SYSTEMS=full   bash benchmarks/serving_gpu.sh
#   COMBINE=1 bash benchmarks/serving_gpu.sh          # one table + plot from the runs above
# Knobs: RATES ("0.1 0.2 0.3 0.4"), DURATION (70 s of arrivals per rate), DRAIN (20 s),
#        OUTPUT_LEN (16384 forced tokens), KV_GIB (8), MODEL (qwen3-8b), TAG (file name suffix).
# A 16,384-token request lives about 3 minutes, so 70 s windows measure how each system copes with
# the first minutes of a load (full KV fills its 8 GiB there and starts preempting). Closer to the
# steady state in one call per system: STAIRCASE=1 runs the rates back to back (each from the load
# the previous one left), stopping after the first not sustained or at TIME_LIMIT seconds; the
# committed runs (benchmarks/results/issue13/staircase_12288/, one call each) were
#   STAIRCASE=1 SYSTEMS=full   RATES="0.1 0.14 0.18 0.22" DURATION=140 OUTPUT_LEN=12288 KV_GIB=16 DRAIN=10 \
#     TIME_LIMIT=565 TAG=_12k bash benchmarks/serving_gpu.sh
#   STAIRCASE=1 SYSTEMS=zipage RATES="0.3 0.38 0.45 0.55" DURATION=140 OUTPUT_LEN=12288 KV_GIB=16 DRAIN=10 \
#     TIME_LIMIT=565 TAG=_12k bash benchmarks/serving_gpu.sh
#   python benchmarks/serving.py --combine <the two JSON files> --out benchmarks/results/serving_qwen3-8b.json
# A request of 12,288 tokens lives ~130 s, about one 140 s window, so full KV's last stage above was judged
# before its queue grew. The committed comparison (benchmarks/results/issue13/steady_12288/, combined into
# benchmarks/results/serving_qwen3-8b.json): 145 s per rate, ~3.4 lifetimes in all, rates at ~0.77, 0.9 and
# 1.03 of each system's capacity by Little's law (full KV ~0.156 req/s, zipage ~0.433), one call each:
#   STAIRCASE=1 SYSTEMS=full   RATES="0.12 0.14 0.16" DURATION=145 OUTPUT_LEN=12288 KV_GIB=16 DRAIN=10 \
#     TIME_LIMIT=565 TAG=_12k_steady bash benchmarks/serving_gpu.sh
#   STAIRCASE=1 SYSTEMS=zipage RATES="0.33 0.39 0.45" DURATION=145 OUTPUT_LEN=12288 KV_GIB=16 DRAIN=10 \
#     TIME_LIMIT=565 TAG=_12k_steady bash benchmarks/serving_gpu.sh
# Result: full KV sustains 0.14, zipage 0.39 (2.8x).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-qwen3-8b}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${COMBINE:-0}" = 1 ]; then
  python3 benchmarks/serving.py --combine "$OUT"/serving_"$MODEL"_*.json --out "$OUT/serving_$MODEL.json"
  exit $?
fi
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 annotated-doc==0.0.7 \
    opentelemetry-api==1.45.2 h11==0.16.0 click==8.5.1 || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import fastapi, uvicorn, pydantic, prometheus_client, httpx, torch; print('fastapi', fastapi.__version__, \
'uvicorn', uvicorn.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/serving_env.txt"
SYSTEMS=${SYSTEMS:-zipage full}
for system in $SYSTEMS; do
  python3 benchmarks/serving.py --model "$MODEL" --systems "$system" --budget 2048 --kv-gib "${KV_GIB:-8}" \
    --rates ${RATES:-0.1 0.2 0.3 0.4} --duration "${DURATION:-70}" --drain "${DRAIN:-20}" \
    --output-len "${OUTPUT_LEN:-16384}" --input-len 100 300 ${STAIRCASE:+--staircase --time-limit "${TIME_LIMIT:-570}"} \
    --out "$OUT/serving_${MODEL}_${system}${TAG:-}.json" 2>&1 | tee "$OUT/serving_${MODEL}_${system}${TAG:-}.log" | tail -20
done
