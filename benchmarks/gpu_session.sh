#!/usr/bin/env bash
# One device call for a session's GPU checks (results under $OUT, default benchmarks/results/):
#   PART=fp8   the FP8 GPU tests and the FP8 throughput pair (zipage-2048 vs zipage-2048-fp8, Qwen3-8B
#              shapes, the same 80 GiB of KV, 512 requests)
#   PART=final the decode kernel on FP8 vs bf16 pages with launch variants, the GPU tests of FP8 and
#              sliding-window models, and `zipage bench/eval --model PATH` (benchmarks/model_gpu.sh;
#              carry .cache/issue16, made by `python benchmarks/make_model.py --assets .cache/issue16`)
#   PART=fp8kernel  every FP8 decode kernel variant timed (benchmarks/fp8_decode_tune.py), then the engine
#              with the fastest one: zipage-2048 vs zipage-2048-fp8 (512 requests, 80 GiB of KV) and full KV
#              bf16 vs fp8 (20 GiB of KV, so the pool limits both), the GPU tests of the FP8, sliding-window
#              and generate() paths, the prefill kernel variants (benchmarks/prefill_tune.py, if present),
#              and generate() against DynamicCache (benchmarks/generate_speed.py gpu) with what time is left
#   PART=int8  INT8 pages and the engine's prefill launch on the GPU: the GPU tests of the 8-bit kernels,
#              engine and prefill, then the engine three ways (zipage-2048 in bf16, FP8 and INT8 pages,
#              Qwen3-8B shapes, 512 requests, the same 80 GiB of KV), then generate() against DynamicCache
#   PART=tma   the FP8 decode kernel with tiles read from one page and through tensor descriptors
#              (benchmarks/fp8_decode_tune.py), its GPU tests, then zipage-2048 in FP8 (the fastest
#              variant) and bf16 pages (Qwen3-8B shapes, 512 requests, 80 GiB of KV)
#   PART=tma2  the 8-bit decode default (tensor-descriptor tiles) on FP8 and INT8 pages: kernel rows, the
#              8-bit GPU tests, then zipage-2048 with INT8, FP8 and bf16 pages (512 requests, 80 GiB of KV)
#   PART=gen   the GPU tests of generate() (peak memory, rows sized to the run's end), of 8-bit pages
#              (INT8 rotated; FP8 with and without ZIPAGE_FP8_ROTATION=1), then generate() against
#              DynamicCache over the GPU plan (benchmarks/generate_speed.py gpu)
#   PART=steady the GPU peak-memory tests of generate() and the rotated 8-bit engine tests, then zipage-2048
#              with INT8 (rotated), FP8 and bf16 pages run long enough to pass the budget (Qwen3-8B shapes,
#              512 requests, 80 GiB of KV, TIME_LIMIT s each)
#   PART=gen8b the GPU peak-memory tests of generate(), then generate() against DynamicCache on Qwen3-8B
#              shapes (batch 16 and 1, 512 new tokens)
#   PART=flash the GPU tests of prefill through PyTorch's FlashAttention and of generate(), the prefill sweep with
#              its flash rows, then profile_generate.py (Qwen3-0.6B and -8B shapes, batch 16)
#   PART=genlong generate() at batch 1 (both models) and well past the budget (Qwen3-0.6B, 2,048 tokens), warmed
#   PART=genlong2 the rows genlong's limits cut: batch 16 at 2,048 tokens past a 512 budget, Qwen3-8B at batch 1
#   PART=gen4k  generate() at batch 16, 4,096 new tokens past a 512 budget (Qwen3-0.6B shapes), warmed
#   PART=host   generate()'s dense decode steps before (.before, carried) and after a change: batch 16 and 1
#   PART=steps  generate()'s decode step, zipage vs DynamicCache taking turns, before (.before) and after; peak1
#   PART=lean   generate()'s GPU tests, steps at batch 16 and the peak probe (default and cuDNN)
#   PART=pastbudget the 4K-prompt step at batch 16, before and after, then the step-by-step peak probe
#   PART=fp8prefill 8-bit pages' prefill dequantized first against codes in the kernel (tests, sweep, engine TTFT)
#   PART=afterfix the batch-1 peak as requested bytes, then batch 1 at 16K and Qwen3-8B at 4K past the budget
#   PART=longsteps generate()'s decode step far past the budget (long prompts), the two caches taking turns
#              (LS_NEW decode steps, default 512; PROMPTS at batch 16, default 1024 4096 16384)
#   PART=peak1  generate()'s peak at batch 1, zipage against DynamicCache, after 1, 64 and 512 new tokens
#   PART=profile where generate()'s decode step spends host time, zipage against DynamicCache
#              (benchmarks/profile_generate.py, Qwen3-0.6B and -8B shapes, batch 16), then
#              generate_speed.py gpu with an untimed run of every cache before each variant
#   PART=vdim  8-bit values stored dimension-major (the engine's default): the 8-bit GPU tests, then zipage-2048-fp8
#              with ZIPAGE_DIM_MAJOR_VALUES=1 and =0 (token-major, as before), TIME_LIMIT s each, same GPU
#   PART=vdim2 the GPU tests vdim's time limit cut (8-bit engine, prefill), then zipage-2048 with FP8 (values
#              dimension-major) and bf16 pages past the budget (TIME_LIMIT s each, default 125)
#   PART=vdimab zipage-2048-fp8 with values dimension-major (ZIPAGE_DIM_MAJOR_VALUES=1) and token-major (=0), past
#              the budget (TIME_LIMIT s each, default 100), same GPU
#   PART=vdimtune the engine's 8-bit decode launch (values dimension-major) over tiles, warps, stages and a
#              register cap (maxnreg 128 / 96: more programs per multiprocessor), after the 8-bit decode GPU tests
#   PART=vdimlong the long-prompt workload's time to first token on FP8 pages with values dimension-major and
#              token-major (ZIPAGE_DIM_MAJOR_VALUES=1 / 0), prefill dequantized first (the default) and reading codes
#   PART=stepprofile where the FP8 decode step's time goes past the 8-bit kernel (0.85 of the copy bandwidth now,
#              yet the step is 1.44x its compute floor): profile_step.py at 490 requests in FP8 and 252 in bf16
#   PART=storetune the decode step's KV store per layer (benchmarks/store_bench.py: bf16, 8-bit values token- and
#              dimension-major, keys alone), the 8-bit decode GPU tests, then the engine's 8-bit decode launch over
#              tiles, warps, stages and register caps at 490 requests, contexts 1,076 and 2,176 (vdimtune's rows)
#   PART=ladder the engine's and generate()'s GPU tests, then the FP8 decode step at 490 requests padded to a captured
#              graph (max_num_seqs 512) before (.before) and after the graph ladder every 16 from 192
#   PART=querykeep generate()'s decode step against DynamicCache before (.before) and after a change to which
#              steps keep their queries (200- and 4,096-token prompts, batch 16)
#   PART=nanstore the KV store per layer before (.before = fae3c3e) and after the 8-bit store's NaN check
#   PART=exacttail GPU tests of exact tails, then generate()'s decode step on FP8 pages with and without
#              exact_tail=16 (and bf16 pages), against DynamicCache: what the paged path's merge costs; then the
#              engine's throughput on FP8 pages with and without exact_tail=16
#   PART=scalesearch FP8 pages' scale search on the GPU: its tests, the store per layer (decode and a prompt) and the
#               engine's FP8 decode step, with and without the search (session 37), and with the keys' search
#               weighted by the queries' moments (session 38)
#   PART=longtail exact tails longer than the window (session 36) and the merge kernel's ring rows as tensor-core
#              tiles: STAGE=a: GPU tests, the engine's FP8 decode step with exact_tail=16 before (.before, carried:
#              the row-at-a-time merge) and after, and after with tails of 0, 16, 32 and 64; STAGE=b: throughput of
#              zipage-2048, zipage-2048-fp8 and zipage-2048-fp8-tail32, the same run
#   PART=vedge the 8-bit decode kernel's partial-tile value rows (zeroed as bytes, after conversion, or left with
#              NaN codes read as finite) and values stored dimension-major: GPU tests, then the kernel rows (tma)
#   PART=fullkv8 full KV in FP8 pages against full KV in bf16 pages (the "full-KV fp8 against full-KV bf16"):
#              zipage-fullkv and zipage-fullkv-fp8, Qwen3-8B shapes, 512 requests of up to 4,096 forced tokens, the
#              same KV_GIB GiB of KV (default: 80 on a card of over 100 GB, an H200; else 40), TIME_LIMIT s each
#              (default 100), then the FP8
#              engine tests
#   PART=vplain the FP8 decode kernel with stale value rows converted plainly (v_edge=plain) against the default:
#              kernel rows, the engine's FP8 decode step both ways (ZIPAGE_FP8_DECODE), the 8-bit decode GPU tests
#   PART=plaincheck the GPU tests of the FP8 decode default (two warps, plain stale rows on the engine's pools) and the
#              NaN store case, then PART=fp8pair (prepared in session 42, not yet run)
#   PART=prefilllazy (session 44; the -lazy variant it timed is removed since) the GPU tests allgpu's limit cut and
#              those of the engine and generate(), then the prefill sweep
#   PART=s44final the GPU tests of the engine, generate(), exact tails, FP8 engine and kept positions
#   PART=allgpu every GPU test of the suite (TEST_LIMIT s at most), the slowest 15 named
#   PART=s45a  the prefill sweep with bucketed cuDNN for whole prompts and -ws launches, then (H200) fp8pair
#   PART=s45b  GPU tests with whole prompts through the fused attention, and the prefill sweep with ragged cases
#   PART=s45c  the long-prompt TTFT with whole prompts through the fused attention and through the paged kernel
#   PART=s45d  the fresh-prefill GPU tests, then (H200) fp8pair
#   PART=s45e  the fresh-prefill GPU tests, the FP8 pair briefly and the prefill sweep after the benchmarks' fixes
#   PART=s45f  the engine's GPU tests after the session's host-side engine changes
#   PART=s46a  the kernel benchmark (benchmarks/kernel_bench.py) with its plot, then the GPU tests of the kernels
#   PART=s46b  the engine's GPU tests after the session's engine changes
#   PART=s46c  the kernel benchmark (prefill rows: the engine's prefill), then PART=s46b
#   PART=s46d  the GPU tests of generate(), fresh prefill, FP8 decode variants, query weights, sampler
#   PART=s48   the engine's GPU tests after session 48's failure-handling and scheduler changes
#   PART=s49    session 49's GPU tests (logit_bias and allowed_token_ids in the sampler, the engine, generate())
#   PART=s52    session 52: cuDNN's ragged attention on whole prompts (frontend wheel in .whl/), in the engine too
#   PART=s52f   session 52: the FP8 pair (an H200)
#   PART=s53t   session 53: the engine's GPU tests with the cuDNN frontend installed (so whole prompts of bf16/fp16
#              models take cuDNN's ragged attention, the default where it can run)
#   PART=s53u   session 53: the cuDNN route's GPU tests after the review (the check at start, head layouts, the
#              engine's buckets), then the engine's GPU tests with the frontend installed
#   PART=s53b   session 53: cuDNN graph builds per key: fixed graphs, dynamic shapes with a kernel cache, one graph
#              with shape overrides (benchmarks/cudnn_graph_builds.py)
#   PART=s54    session 54: s53u's GPU tests (the cuDNN route's checks after review, never run on a GPU), the autotuned
#              graphs' test, the query weights' GPU tests (calibrated once: ZIPAGE_FP8_QUERY_WEIGHTS=calibrated),
#              then the probe with every cuDNN plan timed (CudnnPrefill(autotune=True)) and the baseline, default
#              plan and fastest plan alternated three times a case
#   PART=s54b   session 54: with FP8 keys' query weights calibrated once by default, the GPU tests of the FP8 engine,
#              query weights, exact tails, rotated pages and sliding layers; then zipage-2048-fp8 (Qwen3-8B shapes,
#              KV_GIB of KV, TIME_LIMIT s) with the calibrated default and with ZIPAGE_FP8_QUERY_WEIGHTS=1
#   PART=s55    session 55: s54b's GPU tests after the calibration's final form, with the
#              cuDNN frontend; then the FP8 pair on an H200, else zipage-2048-fp8 with both query-weight modes
#              (TESTS_ONLY=1: the tests alone)
#   PART=s53    session 53: s52's probe again (its JSON), the cuDNN GPU tests, then the engine's time to first token
#              paged kernel against cuDNN's ragged route after a warm-up run, in the order A B B A, on ragged prompts
#              (512-4,096) and on 32 prompts of 4,096; then engine GPU tests with ZIPAGE_FRESH_PREFILL=cudnn
#   PART=s51    session 51: the FP8 pair, then s51h: s49's GPU tests and this session's CPU tests on 5.17
#   PART=s46fp8 the FP8 pair (zipage-2048-fp8, then zipage-2048) run to completion, 512 x 4,096 tokens
#   PART=fp8pair the FP8 throughput pair with the scale search (session 40): zipage-2048 against
#              zipage-2048-fp8, Qwen3-8B shapes, 512 requests, KV_GIB of KV (80 on an H200, else 40), TIME_LIMIT s each
#   PART=storelaunch the quantizing store, whose scale search was 8% of the FP8 decode step on an H100 (session 40),
#              before (.before, carried) and after its candidates' codes became products (a division an element for the first candidate only):
#              STAGE=a the store and query-weight GPU tests, store_bench over launches (ZIPAGE_STORE_LAUNCH: KV
#              heads a program, keys and values apart, warps) in both trees, and a compression's stable sort
#              against topk; STAGE=b the engine's FP8 decode step: before, after, and after with LAUNCH
set -uo pipefail
if [ -z "${PART:-}" ]; then  # (an old part run by mistake costs a session's GPU time: name the one you want)
  echo "gpu_session.sh: set PART to one of the parts listed at the top of this file (e.g. PART=s52)" >&2
  exit 2
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # (absolute: parts that run the tree before, carried as .before, cd into it)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# $1 on a card of over 100 GB (an H200), else $2 (an H100's 80 GB)
big_card() { python3 -c "import torch; print('$1' if torch.cuda.get_device_properties(0).total_memory > 100e9 else '$2')"; }
# zipage-2048-fp8 with 8-bit values dimension-major, then token-major, the same GPU: time limit, timeout, file tag
fp8_value_layouts() {
  for dm in 1 0; do
    ZIPAGE_DIM_MAJOR_VALUES=$dm timeout "$2" python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
      --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 --time-limit "$1" --systems zipage-2048-fp8 \
      --out "$OUT/throughput_qwen3-8b_$3_dm$dm.json" 2>&1 | tail -3
  done
}
# the cuDNN frontend's wheel, carried in .whl/ (run's carry: [".whl"])
cudnn_frontend() {
  python3 -m pip install -q --no-deps .whl/nvidia_cudnn_frontend-*-cp312-*.whl >> "$OUT/install.log" 2>&1 \
    || tail -3 "$OUT/install.log"
}
# benchmarks/throughput.py's long-prompt workload, its summary row printed after a tag: whole prompts through
# ZIPAGE_FRESH_PREFILL=$1, cuDNN's length buckets from $2 (runner.CUDNN_MIN_BUCKET), results in ttft_$3.json,
# more arguments after those
engine_ttft() {
  echo -n "$3: "
  ZIPAGE_FRESH_PREFILL=$1 timeout 100 python3 -c "import runpy, sys; import zipage.engine.runner as r
r.CUDNN_MIN_BUCKET = $2; sys.argv = ['throughput.py'] + sys.argv[1:]; sys.path.insert(0, 'benchmarks')
runpy.run_path('benchmarks/throughput.py', run_name='__main__')" --workload long-prompt --max-tokens 64 \
    --kv-gib 40 --systems zipage-2048 --out "$OUT/ttft_$3.json" "${@:4}" 2>&1 | tail -1
}
case "$PART" in
  ncu)
    for kind in ${KINDS:-fp8 bf16}; do  # (the reports stay on the machine: only text comes back)
      if [ $kind = fp8 ]; then K="regex:_decode_split_fp8"; else K="regex:^_decode_split_kernel"; fi
      timeout 200 ncu --clock-control none --set full --import-source yes -k "$K" --launch-skip 3 --launch-count 1 \
        -f -o "/tmp/ncu_$kind" python3 benchmarks/fp8_decode_profile.py \
        ${FP8_CHOICE:+--fp8-choice "$FP8_CHOICE"} > "$OUT/ncu_$kind.log" 2>&1
      tail -3 "$OUT/ncu_$kind.log"
      ncu -i "/tmp/ncu_$kind.ncu-rep" --page details > "$OUT/ncu_${kind}_details.txt" 2>&1
      ncu -i "/tmp/ncu_$kind.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu_${kind}_sass.csv" 2>&1
      ls -la "$OUT"/ncu_${kind}*
    done
    grep -hE "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Shared Memory Configuration|Dynamic Shared" \
      "$OUT"/ncu_*_details.txt | head -40 ;;
  vdim)
    timeout 260 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py tests/test_fp8_kernels.py \
      tests/test_fp8_engine.py tests/test_paged_prefill.py 2>&1 | tee "$OUT/gpu_tests_vdim.log" | tail -4
    fp8_value_layouts "${TIME_LIMIT:-60}" 160 fp8 ;;
  vdim2)
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py tests/test_paged_prefill.py \
      2>&1 | tee "$OUT/gpu_tests_vdim2.log" | tail -4
    timeout 400 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-125}" --systems zipage-2048-fp8,zipage-2048 \
      --out "$OUT/throughput_qwen3-8b_fp8_vdim_steady.json" 2>&1 | tail -4 ;;
  final32)  # after session 32's small-op changes: the engine's GPU tests, then vdim2's FP8 / bf16 pair (125 s each)
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py tests/test_engine_gpu.py \
      2>&1 | tee "$OUT/gpu_tests_final32.log" | tail -3
    timeout 400 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-125}" --systems zipage-2048-fp8,zipage-2048 \
      --out "$OUT/throughput_qwen3-8b_fp8_smallops_steady.json" 2>&1 | tail -4 ;;
  vdimab)
    fp8_value_layouts "${TIME_LIMIT:-100}" 200 fp8_steady ;;
  vdimtune)
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      2>&1 | tee "$OUT/gpu_tests_vdimtune.log" | tail -3
    timeout 300 python3 benchmarks/fp8_decode_tune.py --match vdim --out "$OUT/fp8_decode_vdimtune.json" 2>&1 | tail -30 ;;
  smallops)  # the step's small ops: per-head norms read in place, greedy argmax without a float copy, the query ring
             # stored by the store kernel; GPU tests, the store per layer (graphs), then profile_step before (.before,
             # carried, with this tree's profile_step.py) and after: FP8 at 490 requests and bf16 at 252
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fused_ops.py tests/test_sampler.py \
      tests/test_fp8_engine.py 2>&1 | tee "$OUT/gpu_tests_smallops.log" | tail -3
    timeout 100 python3 benchmarks/store_bench.py --out "$OUT/store_bench.json" 2>&1 | tail -12
    PART=smallops_pairs bash "$0" ;;  # (session 32's call 3 wrote the profiles' text under $OUT as well)
  smallops2)  # smallops' comparison for the next change (one split: no merge; RoPE a token's heads a program), before
              # (.before, carried) and after, after the GPU tests of the decode kernels, RoPE and norms
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_fused_ops.py \
      tests/test_fp8_kernels.py -k "decode or rope or norm or one_split" 2>&1 | tee "$OUT/gpu_tests_smallops2.log" | tail -3
    PART=smallops_pairs bash "$0" ;;
  ladder)  # session 33: the GPU tests of the engine and generate(), then the decode step at 490 FP8 requests
           # with max_num_seqs 512 (padded to a captured graph, as in a throughput run), before (.before,
           # carried, with this tree's profile_step.py) and after the graph ladder every 16 from 192
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine.py tests/test_engine_requests.py \
      tests/test_fp8_engine.py tests/test_generate_gpu.py 2>&1 | tee "$OUT/gpu_tests_ladder.log" | tail -3
    cp benchmarks/profile_step.py .before/benchmarks/profile_step.py
    for tree in .before .; do
      tag=$([ "$tree" = . ] && echo after || echo before)
      python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
      (cd "$tree" && timeout 110 python3 benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 \
        --max-num-seqs 512 --kv-cache-dtype fp8 --default-only --out "$OUT/profile_fp8_490_ms512_$tag.json" > "/tmp/lad_fp8_$tag.txt" 2>&1
       grep -a 'engine step\|device time' "/tmp/lad_fp8_$tag.txt")
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 ;;
  querykeep)  # session 33: generate()'s decode step (zipage-512 and DynamicCache taking turns) before (.before, carried)
              # and after the rule for which steps keep their queries changed: a 200-token prompt (nothing evicted;
              # the call's last window steps now keep them) and a 4,096-token one (past the budget), batch 16
    for args in "--prompt 200 --new 384" "--prompt 4096 --new 256"; do
      for tree in .before .; do
        tag=$([ "$tree" = . ] && echo after || echo before)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
        (cd "$tree" && timeout 140 python3 "$OLDPWD/benchmarks/generate_steps.py" --batch 16 $args --label "$tag" \
          --out "$OUT/generate_steps_b16_p$(echo $args | cut -d' ' -f2)_$tag.json" 2>&1 | tail -1)
      done
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 ;;
  nanstore)  # prepared in session 33, not yet run: the KV store per layer (benchmarks/store_bench.py, 490 requests)
             # before (.before = fae3c3e, carried) and after the 8-bit store gave rows with a NaN or an infinity a
             # NaN scale (one more reduction in the store kernel)
    for tree in .before .; do
      tag=$([ "$tree" = . ] && echo after || echo before)
      python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
      (cd "$tree" && timeout 80 python3 benchmarks/store_bench.py --requests 490 --out "$OUT/store_nan_$tag.json" \
        2>&1 | tail -5)
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 ;;
  exacttail)  # prepared in session 34, not yet run: exact tails' GPU tests, then generate()'s decode step (zipage-512
              # against DynamicCache taking turns, batch 16, 4,096-token prompt past the budget) on bf16 pages, FP8
              # pages, and FP8 pages with exact_tail=16 (the paged kernel with return_lse plus the merge)
    # STAGE=a: the GPU tests and the engine's decode step; STAGE=b: generate()'s decode steps and throughput
    # (each within one 10-minute call); both by default
    if [ "${STAGE:-ab}" != b ]; then
      timeout 240 python3 -m pytest -q -m gpu tests/test_exact_tail.py tests/test_exact_tail_engine.py 2>&1 | tail -4
      # the engine (session 35): its decode step on FP8 pages without exact tails, with exact_tail=16 (the merge's
      # kernel) and with the merge in PyTorch ops
      for v in none triton torch; do
        tail=$([ $v = none ] && echo 0 || echo 16)
        ZIPAGE_EXACT_TAIL_KERNEL=$([ $v = none ] && echo triton || echo $v) timeout 100 \
          python3 benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 \
          --kv-cache-dtype fp8 --exact-tail $tail --default-only --out "$OUT/profile_fp8_490_tail_$v.json" 2>&1 \
          | grep -a 'engine step\|device time'
      done
    fi
    if [ "${STAGE:-ab}" != a ]; then
      for kv in "" "--kv-cache-dtype fp8" "--kv-cache-dtype fp8 --exact-tail 16"; do
        tag=$(echo "bf16 $kv" | awk '{print ($2 == "" ? "bf16" : ($4 == "" ? "fp8" : "fp8_tail16"))}')
        timeout 100 python3 benchmarks/generate_steps.py --batch 16 --prompt 4096 --new 256 $kv --label "$tag" \
          --out "$OUT/generate_steps_b16_p4096_$tag.json" 2>&1 | tail -1
      done
      # throughput with and without, the same run and memory (the ring's extra memory is beside the pages)
      timeout 280 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
        --max-tokens 4096 --kv-gib 80 --time-limit 100 --systems zipage-2048-fp8,zipage-2048-fp8-tail16 \
        --out "$OUT/throughput_qwen3-8b_fp8_tail16.json" 2>&1 | tail -4
    fi ;;
  scalesearch)  # prepared in session 37, not yet run: FP8 pages' scale search (16 trial scales per stored row) on
                # the GPU: its GPU tests, then the decode step's KV store (store_bench, 490 requests), a prompt's
                # store (8,192 tokens) and the engine's FP8 decode step, each with the search
                # (ZIPAGE_FP8_SCALE_STEPS unset) and without (=1), the same tree
    # STAGE=a: the GPU tests and the stores; STAGE=b: the engine's decode step (each within one 10-minute call)
    if [ "${STAGE:-a}" = a ]; then
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_engine.py \
        tests/test_exact_tail.py 2>&1 | tee "$OUT/gpu_tests_scalesearch.log" | tail -3
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_query_weights.py 2>&1 | tail -2
    fi
    for steps in 1 16; do
      [ "${STAGE:-a}" = a ] || continue
      ZIPAGE_FP8_SCALE_STEPS=$steps timeout 80 python3 benchmarks/store_bench.py --requests 490 \
        --out "$OUT/store_steps$steps.json" 2>&1 | grep -a fp8
      ZIPAGE_FP8_SCALE_STEPS=$steps timeout 60 python3 benchmarks/store_prompt_bench.py --label "steps $steps: "
    done
    for run in 1:0 16:0 16:1; do  # (scales tried : keys weighted by the queries' moments)
      [ "${STAGE:-a}" = b ] || continue
      steps=${run%:*}; qw=${run#*:}
      ZIPAGE_FP8_SCALE_STEPS=$steps ZIPAGE_FP8_QUERY_WEIGHTS=$qw timeout 180 python3 benchmarks/profile_step.py \
        --requests 490 --prompt-tokens 1024 --kv-cache-dtype fp8 --default-only \
        --out "$OUT/profile_fp8_490_steps${steps}_qw$qw.json" > "$OUT/profile_steps${steps}_qw$qw.txt" 2>&1
      echo "steps $steps, query weights $qw:"; grep -a 'engine step\|device time' "$OUT/profile_steps${steps}_qw$qw.txt"
    done ;;
  longtail)
    if [ "${STAGE:-a}" = a ]; then
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_exact_tail.py tests/test_exact_tail_engine.py \
        2>&1 | tee "$OUT/gpu_tests_longtail.log" | tail -3
      for tree in .before .; do
        tag=$([ "$tree" = . ] && echo after || echo before)
        tails=$([ "$tree" = . ] && echo 16,0,32,64 || echo 16)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
        (cd "$tree" && timeout 220 python3 benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 \
          --kv-cache-dtype fp8 --exact-tail $tails --default-only --out "$OUT/profile_fp8_490_tails_$tag.json" \
          > "/tmp/profile_tails_$tag.txt" 2>&1; grep -a 'engine step\|device time' "/tmp/profile_tails_$tag.txt")
      done
      python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    else
      timeout 560 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
        --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-100}" \
        --systems zipage-2048,zipage-2048-fp8,zipage-2048-fp8-tail32 --out "$OUT/throughput_qwen3-8b_fp8_tail32.json" \
        2>&1 | tail -5
    fi ;;
  storelaunch)
    if [ "${STAGE:-a}" = a ]; then
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_kernels.py tests/test_query_weights.py \
        -k "store or weights" 2>&1 | tee "$OUT/gpu_tests_storelaunch.log" | tail -3
      timeout 200 python3 benchmarks/store_bench.py --requests 490 --out "$OUT/store_launches.json" \
        --launches "default;heads=1,split=1,warps=1;heads=1,warps=1;heads=2,split=1,warps=1;heads=2,split=1,warps=2;heads=1,split=1,warps=2;heads=4,split=1,warps=4" \
        2>&1 | grep -a "fp8\|int8"
      if [ -d .before ]; then  # (the tree before the change, carried: its store_bench, default and one launch)
        python3 -m pip install -q --no-deps --no-build-isolation -e .before >> "$OUT/install.log" 2>&1 \
          || { echo "installing .before failed: $OUT/install.log"; exit 1; }
        echo "before:"
        (cd .before && timeout 120 python3 benchmarks/store_bench.py --requests 490 --out "$OUT/store_launches_before.json" \
          --launches "default;heads=1,split=1,warps=1" 2>&1 | grep -a "fp8\|int8")
        python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
      fi
      # a compression's selection: the stable sort that breaks exact ties by position (session 40) against topk
      timeout 60 python3 -c "
import torch
for rows, S, k in ((8, 2304, 2048), (64, 2304, 2048), (8 * 36, 2304, 2048)):
    s = torch.randn(rows, S, device='cuda')
    for name, f in (('topk', lambda: torch.topk(s, k, dim=-1, sorted=False).indices.sort(dim=-1).values),
                    ('stable sort', lambda: torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values)):
        f(); torch.cuda.synchronize(); a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50): f()
        b.record(); torch.cuda.synchronize(); print(f'select {rows} rows x {S} keep {k}: {name} {a.elapsed_time(b) / 50 * 1000:.1f} us')
"
      # the fastest launch of the engine's case (values dimension-major, keys query-weighted), for STAGE=b
      python3 -c "
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))['rows'] if r['pages'] == 'fp8 query-weighted keys']
best = min(rows, key=lambda r: r['us_per_layer'])
print(best['launch'] if best['launch'] != 'default' else '')" "$OUT/store_launches.json" > /tmp/zipage_best_launch \
        && echo "fastest launch: '$(cat /tmp/zipage_best_launch)'"
    else  # the engine's FP8 decode step: the tree before (default launch), then this tree's default and LAUNCH
      # (the old launch, heads=0,split=0,warps=4, and LAUNCH if set or STAGE=a found one on this machine)
      LAUNCH=${LAUNCH:-$(cat /tmp/zipage_best_launch 2>/dev/null)}
      reqs=$(big_card 490 175)
      for run in before: after: after:heads=0,split=0,warps=4 ${LAUNCH:+"after:$LAUNCH"}; do
        tree=$([ "${run%%:*}" = before ] && echo .before || echo .); launch=${run#*:}
        [ -d "$tree" ] || continue
        tag=${run%%:*}_$(echo "${launch:-default}" | tr '=,' '-_')  # (plain file names: they come back from the machine)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1 \
          || { echo "installing $tree failed: $OUT/install.log"; exit 1; }
        (cd "$tree" && ZIPAGE_STORE_LAUNCH="$launch" timeout 150 python3 benchmarks/profile_step.py --requests "$reqs" \
          --prompt-tokens 1024 --kv-cache-dtype fp8 --default-only --out "$OUT/profile_fp8_$tag.json" \
          > "$OUT/profile_$tag.txt" 2>&1)
        echo "$run:"; grep -a 'engine step\|device time\|_store_fp8' "$OUT/profile_$tag.txt"
      done
      python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    fi ;;
  storeprompt)  # a prompt's quantizing store (8,192 tokens a layer): the tree before, then this tree's launches
    for run in .before:default .:default .:heads=0,split=0,warps=4; do
      tree=${run%%:*}; launch=${run#*:}; [ "$launch" = default ] && launch=""
      [ -d "$tree" ] || continue
      python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1 \
        || { echo "installing $tree failed: $OUT/install.log"; exit 1; }
      ZIPAGE_STORE_LAUNCH="$launch" timeout 60 python3 benchmarks/store_prompt_bench.py --label "$run " \
        | tee -a "$OUT/storeprompt.txt"  # (this tree's script times the tree installed)
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_engine.py \
      tests/test_query_weights.py tests/test_exact_tail_engine.py 2>&1 | tee "$OUT/gpu_tests_storeprompt.log" | tail -3 ;;
  vplain)  # the FP8 decode kernel with a partial tile's stale value rows converted as any other (v_edge=plain, for
           # pools that hold no NaN code) against the default (NaN codes read as +-448): kernel rows at 490 and 512
           # requests, then the engine's FP8 decode step (profile_step.py) both ways, then the 8-bit decode GPU tests
    timeout 240 python3 benchmarks/fp8_decode_tune.py --match "${MATCH:-tma/none/vdim,tma/plain/vdim}" --batches "$(big_card 490 175),512" \
      --ctx 1088,2176 --out "$OUT/fp8_decode_vplain.json" 2>&1 | grep -a "vdim\|general\|ctx"
    reqs=$(big_card 490 175)
    for edge in ${EDGES:-none plain}; do  # v_edge[/num_warps]
      w=${edge#*/}; [ "$w" = "$edge" ] && w=4; edge=${edge%/*}
      ZIPAGE_FP8_DECODE="convert=fp16,head_fast=1,load=tma,v_edge=$edge,block_n=128,num_warps=$w,num_stages=3" \
        timeout 150 python3 benchmarks/profile_step.py --requests "$reqs" --prompt-tokens 1024 --kv-cache-dtype fp8 \
        --default-only --out "$OUT/profile_fp8_${edge}_w$w.json" > "$OUT/profile_${edge}_w$w.txt" 2>&1
      echo "v_edge=$edge num_warps=$w:"; grep -a 'engine step\|device time\|_decode_split_fp8\|_store_fp8' "$OUT/profile_${edge}_w$w.txt"
    done
    [ -n "${SKIP_TESTS:-}" ] && exit 0
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py tests/test_fp8_kernels.py \
      2>&1 | tee "$OUT/gpu_tests_vplain.log" | tail -3
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py -k nan 2>&1 | tail -1 ;;
  plaincheck)  # prepared in session 42, not yet run (its device time ran out): the GPU tests of the FP8 decode default as
              # it is now (two warps and plain stale rows on the engine's pools), the NaN store case, then the FP8 pair
    timeout 220 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py tests/test_fp8_engine.py \
      2>&1 | tee "$OUT/gpu_tests_plaincheck.log" | tail -3
    timeout 30 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py -k nan 2>&1 | tail -1
    PART=fp8pair bash "$0" ;;
  allgpu)  # every GPU test of the suite, the slowest 15 named (a check of the whole tree on one card)
    timeout "${TEST_LIMIT:-520}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/ --durations=15 2>&1 \
      | tee "$OUT/gpu_tests_all.log" | tail -25 ;;
  prefilllazy)  # session 44: the GPU tests the last full run did not reach and those of the engine and generate()
    # (host-side changes since), then the prefill sweep with lazily rescaled sums (-lazy) and two-stage 128 x 128 tiles
    timeout "${TEST_LIMIT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_paged_prefill.py \
      tests/test_query_weights.py tests/test_sampler.py tests/test_sliding_engine.py tests/test_engine_gpu.py \
      tests/test_generate_gpu.py tests/test_engine_requests.py tests/test_custom_generate.py --durations=8 2>&1 \
      | tee "$OUT/gpu_tests_s44.log" | tail -14
    timeout 200 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" 2>&1 | tail -12 ;;
  s44final)  # session 44's last call: the GPU tests of the engine, generate(), exact tails, FP8 engine and kept
    # positions after its host-side changes (admission by a request's length, the capture's attention lookup)
    timeout "${TEST_LIMIT:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py \
      tests/test_engine_requests.py tests/test_generate_gpu.py tests/test_generate_memory.py tests/test_kept_positions.py \
      tests/test_exact_tail_engine.py tests/test_fp8_engine.py tests/test_sliding_engine.py tests/test_query_weights.py \
      --durations=8 2>&1 | tee "$OUT/gpu_tests_s44_final.log" | tail -14 ;;
  s45a)  # session 45: the prefill sweep with whole prompts through bucketed, batched cuDNN (kernels/fresh_prefill.py)
    # and (removed since) the mask-free loop warp-specialized by the compiler (-ws); then, on an H200, the FP8 pair
    timeout 200 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" --budget-s 150 \
      --variants m64n64w4s3-tma,m128n128w8s3-tma \
      --fp8-variants m64n64w4s3-tma 2>&1 | tail -22
    [ "$(big_card 1 0)" = 1 ] && PART=fp8pair bash "$0" ;;
  s45b)  # session 45: the GPU tests of the engine with whole prompts through the fused attention (the default on
    # this card now) and of the fresh-prefill kernel, then the prefill sweep (ragged cases, the host plan per step)
    timeout "${TEST_LIMIT:-330}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fresh_prefill.py \
      tests/test_engine_gpu.py tests/test_engine_requests.py tests/test_fp8_engine.py tests/test_sliding_engine.py \
      tests/test_exact_tail_engine.py tests/test_query_weights.py tests/test_kept_positions.py --durations=6 2>&1 \
      | tee "$OUT/gpu_tests_s45b.log" | tail -12
    timeout 170 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" --budget-s 120 \
      --variants m64n64w4s3-tma --fp8-variants m64n64w4s3-tma 2>&1 | tail -22 ;;
  s45c)  # session 45: the long-prompt workload's time to first token, whole prompts through the fused attention
    # or the paged kernel, twice each in turn (bf16 pages)
    lp="--workload long-prompt --requests 16 --max-tokens 64 --kv-gib 40"
    for run in 1 2; do
      for fresh in 0 1; do
        ZIPAGE_FRESH_PREFILL=$fresh timeout 120 python3 benchmarks/throughput.py $lp --systems zipage-2048 \
          --out "$OUT/longprompt_fresh${fresh}_$run.json" 2>&1 | tail -1
      done
    done
    for fresh in 0 1; do  # prompts of one length, 4,096 tokens (two a step at 8,192 batched tokens)
      ZIPAGE_FRESH_PREFILL=$fresh timeout 100 python3 benchmarks/throughput.py --workload long-prompt \
        --prompt-len 4096,4096 --requests 32 --max-tokens 64 --kv-gib 40 --systems zipage-2048 \
        --out "$OUT/prompt4096_fresh${fresh}.json" 2>&1 | tail -1
    done ;;
  s45d)  # session 45: the fresh-prefill GPU tests (the engine's path through cuDNN), then on an H200 the FP8 pair
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fresh_prefill.py tests/test_engine_models.py \
      2>&1 | tee "$OUT/gpu_tests_s45d.log" | tail -4
    [ "$(big_card 1 0)" = 1 ] && PART=fp8pair bash "$0" ;;
  s45e)  # session 45: the fresh-prefill GPU tests; the benchmark scripts after their review fixes (warm-up off the
    # timed prompts' pages, the decode floor without the embedding table, decode steps by schedule): the FP8 pair
    # briefly on this card (KV_GIB of KV, TIME_LIMIT s each) and the prefill sweep's default launch
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fresh_prefill.py tests/test_engine_models.py \
      2>&1 | tee "$OUT/gpu_tests_s45e.log" | tail -4
    timeout 260 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib "${KV_GIB:-50}" --time-limit "${TIME_LIMIT:-60}" \
      --systems zipage-2048,zipage-2048-fp8 --out "$OUT/throughput_qwen3-8b_fp8_s45.json" 2>&1 | tail -5
    timeout 120 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" --budget-s 80 \
      --variants m64n64w4s3-tma --fp8-variants m64n64w4s3-tma 2>&1 | tail -20 ;;
  s45f)  # session 45's last call: the engine's GPU tests (CUDA graphs) after its host-side changes (a layer's
    # attention seen twice refused, the KV heads checked, finished requests bounded, scorers per budget bounded)
    timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py \
      tests/test_engine_requests.py tests/test_fresh_prefill.py tests/test_sliding_engine.py --durations=5 2>&1 \
      | tee "$OUT/gpu_tests_s45f.log" | tail -10 ;;
  s46a)  # session 46: the kernel benchmark after session 45's fixes to it (its first GPU run since), with its plot
    timeout 300 python3 benchmarks/kernel_bench.py --out "$OUT/kernels.json" --plot "$OUT/kernels.png" 2>&1 \
      | tee "$OUT/kernels_stdout.txt" | tail -45
    # then the GPU tests of the kernels that fold FP8 value scales into the probabilities (scaled per tile since)
    timeout "${TEST_LIMIT:-220}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_kernels.py \
      tests/test_paged_prefill.py tests/test_kernels_triton.py 2>&1 | tee "$OUT/gpu_tests_s46a.log" | tail -6 ;;
  s46b)  # session 46: the engine's GPU tests after its changes (a finished flight dropped at once, per-slot maps of
    # budgets of their own released with their slots), with CUDA graphs and asynchronous scheduling and compression
    timeout "${TEST_LIMIT:-400}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_gpu.py \
      tests/test_engine_requests.py tests/test_kept_positions.py tests/test_fp8_engine.py tests/test_sliding_engine.py \
      tests/test_exact_tail_engine.py --durations=5 2>&1 | tee "$OUT/gpu_tests_s46b.log" | tail -12 ;;
  s46c)  # session 46: the kernel benchmark with its prefill rows timing the engine's prefill, then the engine's GPU
    # tests after the second round of engine changes (cancels deferred while the lock is held, release hooks)
    timeout 150 python3 benchmarks/kernel_bench.py --out "$OUT/kernels.json" --plot "$OUT/kernels.png" 2>&1 \
      | tee "$OUT/kernels_stdout.txt" | grep -E "prefill|copy bandwidth"
    PART=s46b bash "$0" ;;
  s46d)  # session 46: the GPU tests of generate() (after its cache_config and use_cache changes), fresh prefill,
    # the FP8 decode variants, query weights and the sampler
    timeout "${TEST_LIMIT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py \
      tests/test_generate_memory.py tests/test_fresh_prefill.py tests/test_fp8_decode_variants.py \
      tests/test_query_weights.py tests/test_sampler.py --durations=5 2>&1 | tee "$OUT/gpu_tests_s46d.log" | tail -10 ;;
  s49)  # session 49: the GPU tests after its changes: the sampler's rows with logit_bias and allowed_token_ids
    # against the per-row reference on CUDA, the engine's requests on CUDA, generate() on CUDA
    timeout "${TEST_LIMIT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sampler.py \
      tests/test_engine_requests.py tests/test_generate_gpu.py tests/test_engine_gpu.py --durations=5 2>&1 \
      | tee "$OUT/gpu_tests_s49.log" | tail -8 ;;
  s52)  # session 52: whole prompts through cuDNN's ragged attention (kernels/cudnn_prefill.py; the frontend's wheel
    # carried in .whl/): the probe against gather + SDPA and the Triton kernel, its GPU tests, then the engine's
    # time to first token on ragged prompts of 512-4,096 tokens, the paged kernel against the ragged route
    cudnn_frontend
    timeout "${PROBE_LIMIT:-200}" python3 benchmarks/cudnn_prefill_probe.py --out "$OUT/cudnn_prefill_probe.json" 2>&1 \
      | tee "$OUT/cudnn_prefill_probe.log" | tail -30
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cudnn_prefill.py 2>&1 \
      | tee "$OUT/gpu_tests_s52.log" | tail -4
    [ -n "${NO_ENGINE:-}" ] || for fresh in 0 cudnn; do  # (NO_ENGINE=1: the probe and the tests only)
      ZIPAGE_FRESH_PREFILL=$fresh timeout 110 python3 benchmarks/throughput.py --workload long-prompt \
        --prompt-len 512,4096 --requests 64 --max-tokens 64 --kv-gib 40 --systems zipage-2048 \
        --out "$OUT/ragged_prompts_fresh_$fresh.json" 2>&1 | tail -1
    done ;;
  s53)  # session 53: s52 measured once, cold: its first engine run paid the Triton compiles (and the machine's
    # caches) that its second did not, so here a warm-up run goes first and the routes alternate A B B A
    cudnn_frontend
    timeout "${PROBE_LIMIT:-150}" python3 benchmarks/cudnn_prefill_probe.py --out "$OUT/cudnn_prefill_probe.json" 2>&1 \
      | tee "$OUT/cudnn_prefill_probe.log" | tail -12
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cudnn_prefill.py \
      tests/test_fresh_prefill.py 2>&1 | tee "$OUT/gpu_tests_s53.log" | tail -4
    # (the engine's buckets then started at 128)
    engine_ttft cudnn 128 warmup --prompt-len 512,4096 --requests 16
    for rep in a b; do
      order="0 cudnn"; [ $rep = b ] && order="cudnn 0"
      for fresh in $order; do
        engine_ttft $fresh 128 "ragged_${fresh}_$rep" --prompt-len 512,4096 --requests 64
        engine_ttft $fresh 128 "p4096_${fresh}_$rep" --prompt-len 4096,4096 --requests 32
      done
    done ;;
  s53t)  # session 53: the engine's GPU tests through cuDNN's ragged route, now the default where it can run
    cudnn_frontend
    python3 -c "import torch, zipage.engine.runner as r
print('cudnn route by default:', r.fresh_prefill_default(torch.device('cuda'), torch.bfloat16, 128))"
    timeout "${TEST_LIMIT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cudnn_prefill.py \
      tests/test_fresh_prefill.py tests/test_engine_gpu.py tests/test_sliding_engine.py tests/test_fp8_engine.py \
      tests/test_engine_requests.py tests/test_exact_tail_engine.py tests/test_kept_positions.py \
      tests/test_query_weights.py tests/test_engine_failures.py 2>&1 | tee "$OUT/gpu_tests_s53t.log" | tail -8 ;;
  s53u)  # session 53: the ragged route's GPU tests after the review, then the engine's through it
    cudnn_frontend
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_cudnn_prefill.py 2>&1 \
      | tee "$OUT/gpu_tests_s53u_cudnn.log" | tail -6
    timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fresh_prefill.py \
      tests/test_engine_gpu.py tests/test_engine_requests.py tests/test_sliding_engine.py tests/test_fp8_engine.py \
      2>&1 | tee "$OUT/gpu_tests_s53u_engine.log" | tail -6 ;;
  s54)  # session 54: s53u (its tests, the autotuned ones among them), then the probe with the plans timed
    PART=s53u bash "$0"
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_query_weights.py 2>&1 \
      | tee "$OUT/gpu_tests_s54_query_weights.log" | tail -3  # (FP8 keys' query weights, calibrated ones among them)
    timeout "${PROBE_LIMIT:-200}" python3 benchmarks/cudnn_prefill_probe.py --out "$OUT/cudnn_prefill_probe.json" 2>&1 \
      | tee "$OUT/cudnn_prefill_probe.log" | tail -16 ;;
  s54b)  # session 54: the FP8 engine's GPU tests with the calibrated query weights, then its throughput both ways
    timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_query_weights.py \
      tests/test_fp8_engine.py tests/test_exact_tail_engine.py tests/test_kv_rotation.py tests/test_sliding_engine.py \
      2>&1 | tee "$OUT/gpu_tests_s54b.log" | tail -4
    for weights in calibrated 1; do
      echo -n "ZIPAGE_FP8_QUERY_WEIGHTS=$weights: "
      ZIPAGE_FP8_QUERY_WEIGHTS=$weights timeout 150 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
        --max-num-seqs 512 --max-tokens 4096 --kv-gib "${KV_GIB:-50}" --time-limit "${TIME_LIMIT:-60}" \
        --systems zipage-2048-fp8 --out "$OUT/throughput_qwen3-8b_fp8_weights_$weights.json" 2>&1 | tail -1
    done ;;
  s55)  # session 55: the calibration's final form (the model's own attention, per-thread masks) on a GPU: s54b's
    # tests with the cuDNN frontend installed; then on an H200 the FP8 pair, else s54b's two modes
    cudnn_frontend
    timeout "${TEST_LIMIT:-220}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_query_weights.py \
      tests/test_fp8_engine.py tests/test_exact_tail_engine.py tests/test_kv_rotation.py tests/test_sliding_engine.py \
      tests/test_fused_ops.py 2>&1 | tee "$OUT/gpu_tests_s55.log" | tail -4
    if [ -n "${TESTS_ONLY:-}" ]; then :; elif [ "$(big_card 1 0)" = 1 ]; then PART=fp8pair bash "$0"; else
      for weights in calibrated 1; do
        echo -n "ZIPAGE_FP8_QUERY_WEIGHTS=$weights: "
        ZIPAGE_FP8_QUERY_WEIGHTS=$weights timeout 150 python3 benchmarks/throughput.py --model qwen3-8b \
          --requests 512 --max-num-seqs 512 --max-tokens 4096 --kv-gib "${KV_GIB:-50}" --time-limit \
          "${TIME_LIMIT:-60}" --systems zipage-2048-fp8 --out "$OUT/throughput_qwen3-8b_fp8_weights_$weights.json" \
          2>&1 | tail -1
      done
    fi ;;
  s53b)  # session 53: what a graph build costs, three ways (the frontend's wheel carried in .whl/); SKIP_BUILDS=1:
    # the engine runs only
    cudnn_frontend
    [ -n "${SKIP_BUILDS:-}" ] || timeout "${PROBE_LIMIT:-240}" python3 benchmarks/cudnn_graph_builds.py \
      --out "$OUT/cudnn_graph_builds.json" 2>&1 | tee "$OUT/cudnn_graph_builds.log" | tail -30
    [ -n "${NO_ENGINE:-}" ] || {  # time to first token: paged kernel (0), cuDNN route with length buckets from 128,
      # and from 2048 (fewer graphs: 3 buckets a batch size here), after a warm-up run, in the order A B C C B A
      set -- --prompt-len 512,4096 --requests 64
      engine_ttft cudnn 2048 warmup "$@"
      engine_ttft 0 128 paged_a "$@"; engine_ttft cudnn 128 cudnn128_a "$@"; engine_ttft cudnn 2048 cudnn2048_a "$@"
      engine_ttft cudnn 2048 cudnn2048_b "$@"; engine_ttft cudnn 128 cudnn128_b "$@"; engine_ttft 0 128 paged_b "$@"
    } ;;
  s52f)  # session 52: the FP8 pair (TIME_LIMIT s each) on an H200
    PART=s46fp8 TIME_LIMIT="${TIME_LIMIT:-100}" bash "$0" ;;
  s51)  # session 51: what stops 49 and 50 owed: the FP8 pair (TIME_LIMIT s each), the GPU tests after the sampler,
    # generate()-hook and cache grad-mode changes, then the CPU tests those changes touched on this machine's
    # transformers (the GPU machine's version, the range's floor)
    PART=s46fp8 TIME_LIMIT="${TIME_LIMIT:-100}" bash "$0"
    PART=s51h bash "$0" ;;
  s51h)  # session 51 without the FP8 pair (any card): the GPU tests (the engine's position probe runs at every
    # LLM built on CUDA), then the CPU tests of this session's changes on this machine's transformers
    PART=s49 TEST_LIMIT="${TEST_LIMIT:-150}" bash "$0"
    python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
    timeout "${CPU_TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_generate.py \
      tests/test_generate_padding.py tests/test_custom_generate.py tests/test_kernels_name.py tests/test_loading.py \
      tests/test_engine_models.py tests/test_model_families.py tests/test_attention_checks.py \
      tests/test_engine_frontend.py 2>&1 | tee "$OUT/cpu_tests_s51.log" | tail -6 ;;
  s48)  # session 48: the engine's GPU tests after its failure-handling and scheduler changes (a compression whose
    # booking raises, held samples, no admission in a step that preempted), the booking failure on CUDA included
    timeout "${TEST_LIMIT:-400}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_engine_failures.py \
      tests/test_engine_gpu.py tests/test_engine_requests.py tests/test_kept_positions.py tests/test_fp8_engine.py \
      tests/test_sliding_engine.py tests/test_exact_tail_engine.py --durations=5 2>&1 \
      | tee "$OUT/gpu_tests_s48.log" | tail -12 ;;
  s46fp8)  # session 46: the FP8 pair run to completion (no time-limit window), FP8 first (the shorter run),
    # 512 requests x 4,096 tokens, Qwen3-8B shapes, KV_GIB of KV (80 on an H200), then the kernel benchmark's rows
    timeout 540 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib "${KV_GIB:-$(big_card 80 40)}" --time-limit "${TIME_LIMIT:-290}" \
      --systems zipage-2048-fp8,zipage-2048 --out "$OUT/throughput_qwen3-8b_fp8_full.json" 2>&1 | tail -6 ;;
  fp8pair)
    timeout 300 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib "${KV_GIB:-$(big_card 80 40)}" --time-limit "${TIME_LIMIT:-100}" \
      --systems zipage-2048,zipage-2048-fp8 --out "$OUT/throughput_qwen3-8b_fp8_search.json" 2>&1 | tail -5 ;;
  fullkv8)
    timeout 420 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib "${KV_GIB:-$(big_card 80 40)}" \
      --time-limit "${TIME_LIMIT:-100}" --systems zipage-fullkv,zipage-fullkv-fp8 \
      --out "$OUT/throughput_qwen3-8b_zzzzzz_fullkv_fp8.json" 2>&1 | tail -5
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_engine.py 2>&1 \
      | tee "$OUT/gpu_tests_fullkv8.log" | tail -3 ;;
  smallops_pairs)
    for tree in .before .; do
      tag=$([ "$tree" = . ] && echo after || echo before)
      python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
      (cd "$tree" && timeout 100 python3 benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 \
        --kv-cache-dtype fp8 --default-only --out "$OUT/profile_fp8_490_$tag.json" > "/tmp/profile_fp8_490_$tag.txt" 2>&1
       grep -a 'engine step\|device time' "/tmp/profile_fp8_490_$tag.txt")
      (cd "$tree" && timeout 80 python3 benchmarks/profile_step.py --requests 252 --prompt-tokens 1024 \
        --default-only --out "$OUT/profile_bf16_252_$tag.json" > "/tmp/profile_bf16_252_$tag.txt" 2>&1
       grep -a 'engine step\|device time' "/tmp/profile_bf16_252_$tag.txt")
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 ;;
  storetune)
    timeout 120 python3 benchmarks/store_bench.py --out "$OUT/store_bench.json" 2>&1 | tail -12
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      2>&1 | tee "$OUT/gpu_tests_storetune.log" | tail -3
    timeout 300 python3 benchmarks/fp8_decode_tune.py --match vdim --ctx 1076,2176 --batches 490 \
      --out "$OUT/fp8_decode_storetune.json" 2>&1 | tail -45 ;;
  vdimlong)
    lp="--workload long-prompt --requests 16 --max-tokens 64 --kv-gib 40"
    for cfg in v2 v2:m128n64w8s3-tma-codes; do
      for dm in 1 0; do
        ZIPAGE_DIM_MAJOR_VALUES=$dm ZIPAGE_PREFILL_KERNEL="$cfg" timeout 110 python3 benchmarks/throughput.py $lp \
          --systems zipage-2048-fp8 --out "$OUT/longprompt_fp8_${cfg#v2:}_dm$dm.json" 2>&1 | tail -1
      done
    done ;;
  stepprofile)
    timeout 280 python3 benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 --kv-cache-dtype fp8 \
      --default-only 2>&1 | tee "$OUT/profile_step_fp8_490.txt" | tail -45
    timeout 250 python3 benchmarks/profile_step.py --requests 252 --prompt-tokens 1024 --default-only 2>&1 \
      | tee "$OUT/profile_step_bf16_252.txt" | tail -45 ;;
  vedge)
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      2>&1 | tee "$OUT/gpu_tests_vedge.log" | tail -4
    timeout 300 python3 benchmarks/fp8_decode_tune.py --match tma --out "$OUT/fp8_decode_vedge.json" 2>&1 | tail -45 ;;
  int8ptx)
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      2>&1 | tee "$OUT/gpu_tests_int8ptx.log" | tail -4
    timeout 100 python3 benchmarks/fp8_decode_tune.py --match int8 --out "$OUT/fp8_decode_int8ptx.json" 2>&1 | tail -12
    timeout 200 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 \
      --kv-gib 80 --time-limit "${TIME_LIMIT:-45}" --systems zipage-2048-int8,zipage-2048-fp8 \
      --out "$OUT/throughput_qwen3-8b_int8ptx.json" 2>&1 | tail -4 ;;
  cfloor)
    timeout 450 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 \
      --kv-gib 80 --time-limit "${TIME_LIMIT:-100}" --systems zipage-2048-fp8,zipage-2048 \
      --out "$OUT/throughput_qwen3-8b_fp8_cfloor.json" 2>&1 | tail -8 ;;
  hm)
    timeout 200 python3 benchmarks/fp8_decode_tune.py --match hf1/tma,hm --out "$OUT/fp8_decode_hm.json" 2>&1 | tail -30 ;;
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
  fp8kernel)
    timeout 120 python3 benchmarks/fp8_decode_tune.py --out "$OUT/fp8_decode_tune.json" --best-env "$OUT/fp8_best.env" \
      2>&1 | tail -62
    FP8ENV=$(cat "$OUT/fp8_best.env" 2>/dev/null | sed 's/^ZIPAGE_FP8_DECODE=//')
    echo "engine FP8 decode kernel: ${FP8ENV:-general}"
    ZIPAGE_FP8_DECODE="$FP8ENV" timeout 150 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
      --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-40}" \
      --systems zipage-2048,zipage-2048-fp8 --out "$OUT/throughput_qwen3-8b_fp8_kernel.json" 2>&1 | tail -6
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      tests/test_fp8_engine.py tests/test_sliding_engine.py tests/test_generate_gpu.py tests/test_kept_positions.py \
      $(ls tests/test_paged_prefill.py 2>/dev/null) 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
    [ -f benchmarks/prefill_tune.py ] && timeout 110 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" \
      2>&1 | tail -30
    ZIPAGE_FP8_DECODE="$FP8ENV" timeout 110 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
      --max-num-seqs 512 --max-tokens 4096 --kv-gib 20 --time-limit 30 \
      --systems zipage-fullkv,zipage-fullkv-fp8 --out "$OUT/throughput_qwen3-8b_fp8_fullkv.json" 2>&1 | tail -6
    timeout 100 python3 benchmarks/generate_speed.py gpu --time-budget 80 --out "$OUT/generate_speed_gpu.json" \
      2>&1 | tail -14 ;;
  last)  # the last GPU minutes of a session: what must be checked first comes first
    timeout 80 python3 benchmarks/fp8_decode_tune.py --out "$OUT/fp8_decode_tune.json" --best-env "$OUT/fp8_best.env" \
      2>&1 | tail -20
    [ -f benchmarks/prefill_tune.py ] && timeout 100 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" \
      2>&1 | tail -30
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py tests/test_sliding_engine.py \
      tests/test_generate_gpu.py tests/test_kept_positions.py $(ls tests/test_paged_prefill.py 2>/dev/null) \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -8
    # the engine pair only when the fastest FP8 kernel beats the general one by 15% or more
    FAST=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); r=[x for x in d['rows'] if x['batch']==512 \
and x['kv']=='fp8' and x['kernel']=='general']; print(int('best' in d and r and d['best']['ms'] < 0.85*r[0]['ms']))" \
      "$OUT/fp8_decode_tune.json" 2>/dev/null)
    if [ "$FAST" = 1 ]; then
      FP8ENV=$(sed 's/^ZIPAGE_FP8_DECODE=//' "$OUT/fp8_best.env")
      echo "engine FP8 decode kernel: $FP8ENV"
      ZIPAGE_FP8_DECODE="$FP8ENV" timeout 130 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
        --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 --time-limit 25 \
        --systems zipage-2048-fp8,zipage-2048 --out "$OUT/throughput_qwen3-8b_fp8_kernel.json" 2>&1 | tail -4
    else
      echo "no FP8 kernel variant 15% faster than the general one: engine pair skipped"
    fi
    timeout 40 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      -k "fp8mma or qwen3 or subnormal" 2>&1 | tee "$OUT/gpu_tests_fp8_decode.log" | tail -4 ;;
  int8)
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_engine.py \
      tests/test_paged_prefill.py 2>&1 | tee "$OUT/gpu_tests_int8.log" | tail -8
    timeout 200 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 --max-tokens 4096 \
      --kv-gib 80 --time-limit "${TIME_LIMIT:-30}" --systems zipage-2048,zipage-2048-fp8,zipage-2048-int8 \
      --out "$OUT/throughput_qwen3-8b_int8.json" 2>&1 | tail -6
    timeout 120 python3 benchmarks/generate_speed.py gpu --time-budget 100 --out "$OUT/generate_speed_gpu.json" \
      2>&1 | tail -14 ;;
  tma)  # FP8 decode tiles from one page / through tensor descriptors, then the engine pair with the fastest
    timeout 150 python3 benchmarks/fp8_decode_tune.py --batches 512 --out "$OUT/fp8_decode_tma.json" --best-env "$OUT/fp8_best.env" \
      2>&1 | tail -40
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py 2>&1 \
      | tee "$OUT/gpu_tests_fp8_decode.log" | tail -4
    FP8ENV=$(sed 's/^ZIPAGE_FP8_DECODE=//' "$OUT/fp8_best.env" 2>/dev/null)
    echo "engine FP8 decode kernel: ${FP8ENV:-general}"
    ZIPAGE_FP8_DECODE="$FP8ENV" timeout 260 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 \
      --max-num-seqs 512 --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-75}" \
      --systems zipage-2048-fp8,zipage-2048 --out "$OUT/throughput_qwen3-8b_fp8_tma.json" 2>&1 | tail -4 ;;
  tma2)  # the 8-bit decode default (tensor-descriptor tiles) for FP8 and INT8: kernel rows, GPU tests, engine
    timeout 100 python3 benchmarks/fp8_decode_tune.py --batches 512 --out "$OUT/fp8_decode_tma2.json" 2>&1 | tail -22
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_decode_variants.py \
      tests/test_fp8_kernels.py tests/test_fp8_engine.py 2>&1 | tee "$OUT/gpu_tests_8bit_default.log" | tail -4
    timeout 290 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-60}" --systems zipage-2048-int8,zipage-2048-fp8,zipage-2048 \
      --out "$OUT/throughput_qwen3-8b_8bit_default.json" 2>&1 | tail -5 ;;
  int8fast)  # INT8 codes to fp16 by bits in the 8-bit decode kernel, then generate() on the GPU (Qwen3-0.6B shapes)
    timeout 60 python3 benchmarks/fp8_decode_tune.py --batches 512 --match int8 --out "$OUT/int8_decode.json" \
      2>&1 | tail -7
    timeout 110 python3 benchmarks/generate_speed.py gpu --only qwen3-0.6b --max-new-tokens 512 --time-budget 80 \
      --out "$OUT/generate_speed_gpu.json" 2>&1 | tail -16 ;;
  gen)
    timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_memory.py tests/test_generate_gpu.py \
      tests/test_fp8_engine.py tests/test_kept_positions.py 2>&1 | tee "$OUT/gpu_tests_gen.log" | tail -5
    ZIPAGE_FP8_ROTATION=1 timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py \
      2>&1 | tee "$OUT/gpu_tests_fp8_rotated.log" | tail -3
    timeout 370 python3 benchmarks/generate_speed.py gpu --time-budget "${GEN_BUDGET:-330}" \
      --out "$OUT/generate_speed_gpu.json" 2>&1 | tail -16 ;;
  steady)
    timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_memory.py tests/test_fp8_engine.py \
      2>&1 | tee "$OUT/gpu_tests_steady.log" | tail -3
    ZIPAGE_FP8_ROTATION=1 timeout 40 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_engine.py \
      2>&1 | tail -1
    timeout 470 python3 benchmarks/throughput.py --model qwen3-8b --requests 512 --max-num-seqs 512 \
      --max-tokens 4096 --kv-gib 80 --time-limit "${TIME_LIMIT:-125}" --systems zipage-2048-int8,zipage-2048-fp8,zipage-2048 \
      --out "$OUT/throughput_qwen3-8b_8bit_steady.json" 2>&1 | tail -6 ;;
  gen8b)
    timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_memory.py 2>&1 \
      | tee "$OUT/gpu_tests_memory.log" | tail -3
    timeout 330 python3 benchmarks/generate_speed.py gpu --only qwen3-8b --max-new-tokens 512 --time-budget 290 \
      --out "$OUT/generate_speed_gpu_8b.json" 2>&1 | tail -12 ;;
  profile)
    for m in qwen3-0.6b qwen3-8b; do
      timeout 150 python3 benchmarks/profile_generate.py --model "$m" --batch 16 --new-tokens 256 \
        --budgets none,512,2048,2048d 2>&1 | grep -v USDT | tee "$OUT/profile_generate_$m.txt" | head -40
    done
    timeout 280 python3 benchmarks/generate_speed.py gpu --time-budget 240 --out "$OUT/generate_speed_gpu.json" \
      2>&1 | tail -14 ;;
  flash)  # prefill through PyTorch's FlashAttention: its GPU tests and the generate() GPU tests, the prefill sweep
          # with the flash rows beside the Triton kernels, then where generate()'s decode step spends host time
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_flash_prefill.py tests/test_paged_prefill.py \
      tests/test_generate_gpu.py tests/test_generate_memory.py 2>&1 | tee "$OUT/gpu_tests_flash.log" | tail -8
    timeout 120 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" \
      --variants m64n64w4s3-tma,m128n128w8s3-tma 2>&1 | tail -16
    for m in qwen3-0.6b qwen3-8b; do
      timeout 100 python3 benchmarks/profile_generate.py --model "$m" --batch 16 --new-tokens 128 \
        --budgets none,512,2048,2048d 2>&1 | grep -v USDT | tee "$OUT/profile_generate_$m.txt" | head -45
    done ;;
  probe)  # the prefill sweep with every PyTorch attention over the step's own K/V, then generate()'s host profile
    timeout 120 python3 benchmarks/prefill_tune.py --out "$OUT/prefill_tune.json" --variants m64n64w4s3-tma \
      2>&1 | tail -16
    for m in qwen3-0.6b qwen3-8b; do
      timeout 150 python3 benchmarks/profile_generate.py --model "$m" --batch 16 --new-tokens 64 --top 30 \
        --budgets none,2048,2048d > "$OUT/profile_generate_$m.txt" 2>&1; grep -v USDT "$OUT/profile_generate_$m.txt" | head -5
    done ;;
  nocudnn)  # SDPA's host time by K/V layout and backend, generate() with dense steps held off cuDNN against
            # letting SDPA pick it (budgets with a c), the generate() GPU tests, then generate_speed.py gpu
    timeout 60 python3 benchmarks/sdpa_host.py --out "$OUT/sdpa_host.json" 2>&1 | tail -16
    timeout 150 python3 benchmarks/profile_generate.py --model qwen3-0.6b --batch 16 --new-tokens 64 --top 14 \
      --budgets none,2048,2048c,2048d,2048dc > "$OUT/profile_generate_qwen3-0.6b.txt" 2>&1
    grep -v USDT "$OUT/profile_generate_qwen3-0.6b.txt" | head -7
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py tests/test_generate_memory.py \
      2>&1 | tee "$OUT/gpu_tests_gen.log" | tail -3
    timeout 250 python3 benchmarks/generate_speed.py gpu --time-budget "${GEN_BUDGET:-220}" \
      --out "$OUT/generate_speed_gpu.json" 2>&1 | tail -16 ;;
  dense)  # generate() with 16-bit rows attended densely on CUDA (the new default): its GPU tests, then against
          # DynamicCache with every length warmed first (WARMUP new tokens) and cold (a second, shorter pass)
    timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py tests/test_generate_memory.py \
      2>&1 | tee "$OUT/gpu_tests_dense.log" | tail -3
    timeout 330 python3 benchmarks/generate_speed.py gpu --max-new-tokens 512 --warmup "${WARMUP:-512}" \
      --time-budget "${GEN_BUDGET:-290}" --out "$OUT/generate_speed_gpu_warm.json" 2>&1 | tail -9 ;;
  dense2)  # where generate()'s remaining host time goes before eviction (Qwen3-0.6B, 256 tokens), then Qwen3-8B
           # shapes at batch 16 against DynamicCache, every length warmed first
    timeout 120 python3 benchmarks/profile_generate.py --model qwen3-0.6b --batch 16 --new-tokens 256 --top 25 \
      --profile-tokens 32 --budgets none,512 > "$OUT/profile_generate_qwen3-0.6b_256.txt" 2>&1
    grep -v USDT "$OUT/profile_generate_qwen3-0.6b_256.txt" | head -4
    timeout 230 python3 benchmarks/generate_speed.py gpu --only qwen3-8b --max-new-tokens 512 --warmup 512 \
      --time-budget 900 --out "$OUT/generate_speed_gpu_8b_warm.json" 2>&1 | tail -6 ;;
  batch1)  # generate() at batch 1 (Qwen3-0.6B shapes) against DynamicCache, every length warmed
    timeout "${GEN_LIMIT:-90}" python3 benchmarks/generate_speed.py gpu --only qwen3-0.6b --batch 1 \
      --max-new-tokens "${NEW:-512}" --warmup "${NEW:-512}" --time-budget 900 \
      --out "$OUT/generate_speed_gpu_b1.json" 2>&1 | tail -5 ;;
  genlong)  # what generate() on the GPU still lacks: batch 1 (both models, 512 tokens), then well past the budget
            # (Qwen3-0.6B shapes, batch 16, 2,048 new tokens, budget 512), every length warmed for DynamicCache
    timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py tests/test_generate_memory.py \
      2>&1 | tee "$OUT/gpu_tests_gen.log" | tail -2
    timeout 150 python3 benchmarks/generate_speed.py gpu --batch 1 --max-new-tokens 512 --warmup 512 --time-budget 900 \
      --out "$OUT/generate_speed_gpu_b1.json" 2>&1 | tail -6
    timeout 330 python3 benchmarks/generate_speed.py gpu --only qwen3-0.6b --batch 16 --max-new-tokens 2048 \
      --warmup 2048 --time-budget 900 --out "$OUT/generate_speed_gpu_long.json" 2>&1 | tail -4 ;;
  genlong2)  # genlong's rows its time limits cut: Qwen3-0.6B shapes at batch 16 well past the budget (2,048 new
             # tokens, budget 512) alone, then Qwen3-8B shapes at batch 1 (512 tokens); every length warmed
    timeout 320 python3 benchmarks/generate_speed.py gpu --only qwen3-0.6b --batch 16 --max-new-tokens 2048 \
      --min-new-tokens 2048 --warmup 2048 --time-budget 900 --out "$OUT/generate_speed_gpu_long.json" 2>&1 | tail -4
    timeout 250 python3 benchmarks/generate_speed.py gpu --only qwen3-8b --batch 1 --max-new-tokens 512 \
      --warmup 512 --time-budget 900 --out "$OUT/generate_speed_gpu_8b_b1.json" 2>&1 | tail -5 ;;
  gen4k)  # generate() far past the budget: Qwen3-0.6B shapes, batch 16, 4,096 new tokens, budget 512 against
          # DynamicCache (whose torch.cat copies its whole cache every step), both warmed over the same lengths
    # (A first try ran past 570 s with nothing written: the JSON comes after all of a variant's caches, which
    # with the untimed runs is 4 x 4,096 decode steps. Its progress now goes to the log as it happens.)
    timeout 570 python3 -u benchmarks/generate_speed.py gpu --only qwen3-0.6b --batch 16 --max-new-tokens 4096 \
      --min-new-tokens 4096 --warmup 4096 --time-budget 900 --out "$OUT/generate_speed_gpu_4k.json" \
      > "$OUT/generate_speed_gpu_4k.log" 2>&1; tail -4 "$OUT/generate_speed_gpu_4k.log" ;;
  peak1)  # where zipage's batch-1 peak differs from DynamicCache's (prefill or decode): 1, 64 and 512 new tokens
    timeout 280 python3 benchmarks/generate_peak_probe.py --new "${NEW:-1,64,512}" --out "$OUT/generate_peak_probe.json" 2>&1 | tail -40 ;;
  host)  # generate()'s dense decode host work, before (the tree in .before, carried) and after, same GPU, same
         # run: the GPU tests of generate(), then Qwen3-0.6B shapes at batch 16 and 1, 512 new tokens, every
         # cache warmed first; each tree in its own process
    # (.before: git archive <rev> | (mkdir -p .before && tar -x -C .before), here, before the call)
    timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py tests/test_generate_memory.py \
      2>&1 | tee "$OUT/gpu_tests_gen.log" | tail -2
    for batch in 16 1; do
      for tree in .before .; do
        tag=$([ "$tree" = . ] && echo after || echo before)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
        (cd "$tree" && timeout 150 python3 benchmarks/generate_speed.py gpu --only qwen3-0.6b --batch "$batch" \
          --max-new-tokens 512 --warmup 512 --time-budget 900 --label "$tag" \
          --out "$OUT/generate_speed_gpu_b${batch}_$tag.json" 2>&1 | tail -4)
      done
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 ;;
  host2)  # host's comparison made steadier (a first try drifted: each process's later runs slower), then peak1:
          # DynamicCache and zipage-512 interleaved 3 times (best of each), 256 new tokens, batch 16 and 1
    for batch in 16 1; do
      for tree in .before .; do
        tag=$([ "$tree" = . ] && echo after || echo before)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
        (cd "$tree" && timeout 100 python3 "$OLDPWD/benchmarks/generate_speed.py" gpu --only qwen3-0.6b --batch "$batch" \
          --max-new-tokens 256 --warmup 256 --repeats 3 --budgets none,512 --time-budget 900 --label "$tag" \
          --out "$OUT/generate_speed_gpu_b${batch}_$tag.json" 2>&1 | tail -2)
      done
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    timeout 250 python3 benchmarks/generate_peak_probe.py --new "${NEW:-1,64,512}" --out "$OUT/generate_peak_probe.json" 2>&1 | tail -40 ;;
  steps)  # host2's comparison step by step (benchmarks/generate_steps.py: DynamicCache and zipage-512 take turns,
          # one decode step each, in one process), before (.before, carried) and after, batch 16 and 1; then peak1
    for batch in ${BATCHES:-16 1}; do
      for tree in .before .; do
        tag=$([ "$tree" = . ] && echo after || echo before)
        python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
        (cd "$tree" && timeout "${STEPS_LIMIT:-160}" python3 "$OLDPWD/benchmarks/generate_steps.py" --batch "$batch" --new 384 \
          --label "$tag" --out "$OUT/generate_steps_b${batch}_$tag.json" 2>&1 | tail -1)
      done
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    timeout 200 python3 benchmarks/generate_peak_probe.py --new "${NEW:-512}" --envs "${ENVS:-default,cudnn,paged}" --out "$OUT/generate_peak_probe.json" \
      2>&1 | tail -40 ;;
  lean)  # generate()'s GPU tests, then steps' comparison (before: .before, carried) at batch 16, then peak1's probe
    timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py tests/test_generate_memory.py \
      2>&1 | tee "$OUT/gpu_tests_gen.log" | tail -2
    BATCHES=16 ENVS=${ENVS:-default,cudnn} PART=steps bash "$0" ;;
  pastbudget)  # the long-prompt step (batch 16, 4K-token prompt, budget 512) before (.before, carried) and after,
               # each tree in its own process, then the step-by-step peak probe at batch 1
    for tree in .before .; do
      tag=$([ "$tree" = . ] && echo after || echo before)
      python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" >> "$OUT/install.log" 2>&1
      (cd "$tree" && timeout 110 python3 "$OLDPWD/benchmarks/generate_steps.py" --batch 16 --prompt 4096 \
        --new "${LS_NEW:-256}" --label "$tag" --out "$OUT/generate_steps_b16_p4096_$tag.json" 2>&1 | tail -1)
    done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
    timeout 150 python3 benchmarks/generate_peak_probe.py --new 512 --steps-only --out "$OUT/generate_peak_probe.json" \
      2>&1 | tail -30 ;;
  afterfix)  # what session 28 left unmeasured: the batch-1 peak as requested bytes (the probe, step by step),
             # then batch 1 at 16K and Qwen3-8B shapes at 4K past the budget with one validity record (f956b3c)
    timeout 150 python3 benchmarks/generate_peak_probe.py --new 512 --steps-only --out "$OUT/generate_peak_probe.json" \
      2>&1 | tail -12
    timeout 120 python3 benchmarks/generate_steps.py --batch 1 --prompt 16384 --new "${LS_NEW:-256}" \
      --out "$OUT/generate_steps_b1_p16384.json" 2>&1 | tail -1
    timeout 150 python3 benchmarks/generate_steps.py --model qwen3-8b --batch 16 --prompt 4096 --new "${LS_NEW:-256}" \
      --out "$OUT/generate_steps_8b_b16_p4096.json" 2>&1 | tail -1 ;;
  fp8prefill)  # 8-bit pages' prefill dequantized first (the default) against the kernel reading codes: GPU tests,
               # the kernel sweep, then the engine's long-prompt TTFT on FP8 pages both ways (two pairs) and on bf16
    timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_paged_prefill.py \
      -k "dequantized_first or (every_variant and not bfloat16)" 2>&1 | tee "$OUT/gpu_tests_fp8prefill.log" | tail -4
    timeout 90 python3 benchmarks/prefill_tune.py --variants m64n64w4s3-tma,m128n128w8s3-tma \
      --out "$OUT/prefill_tune.json" 2>&1 | tail -12
    lp="--workload long-prompt --requests 16 --max-tokens 64 --kv-gib 40"
    for run in 1 2; do
      for cfg in v2:m128n64w8s3-tma-codes v2; do
        ZIPAGE_PREFILL_KERNEL="$cfg" timeout 100 python3 benchmarks/throughput.py $lp --systems zipage-2048-fp8 \
          --out "$OUT/longprompt_fp8_${cfg#v2:}_$run.json" 2>&1 | tail -1
      done
    done
    timeout 100 python3 benchmarks/throughput.py $lp --systems zipage-2048 --out "$OUT/longprompt_bf16.json" 2>&1 \
      | tail -1 ;;
  longsteps)  # generate()'s decode step far past the budget, the two caches taking turns (generate_steps.py): the
              # stored length set by a long prompt (1K, 4K, 16K tokens) and 512 decode steps (two compressions at
              # budget 512), Qwen3-0.6B shapes at batch 16, then batch 1 and Qwen3-8B shapes at 4K
    n=${LS_NEW:-512}
    for p in ${PROMPTS:-1024 4096 16384}; do
      timeout 150 python3 benchmarks/generate_steps.py --batch 16 --prompt "$p" --new "$n" \
        --out "$OUT/generate_steps_b16_p$p.json" 2>&1 | tail -1
    done
    timeout 120 python3 benchmarks/generate_steps.py --batch 1 --prompt 16384 --new "$n" \
      --out "$OUT/generate_steps_b1_p16384.json" 2>&1 | tail -1
    timeout 150 python3 benchmarks/generate_steps.py --model qwen3-8b --batch 16 --prompt 4096 --new "$n" \
      --out "$OUT/generate_steps_8b_b16_p4096.json" 2>&1 | tail -1 ;;
  *) echo "PART must be one of the parts listed at the top of this file, e.g. s54, s53u, s53b, s52f, plaincheck, vplain, storeprompt, fp8pair, ncu, vdim, vdim2, final32, vdimab, vdimtune, smallops, smallops2, ladder, querykeep, nanstore, exacttail, scalesearch, longtail, storelaunch, fullkv8, smallops_pairs, storetune, vdimlong, stepprofile, vedge, int8ptx, cfloor, hm, fp8, final, fp8kernel, last, int8, tma, tma2, int8fast, gen, steady, gen8b, profile, flash, probe, nocudnn, dense, dense2, batch1, genlong, genlong2, gen4k, peak1, host, host2, steps, lean, pastbudget, afterfix, fp8prefill, longsteps" >&2; exit 2 ;;
esac
