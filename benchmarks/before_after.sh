#!/usr/bin/env bash
# One device call: the throughput benchmark on an older tree and on this one, same GPU, same run.
#
#   git archive REV | (mkdir -p .before && tar -x -C .before)      # here, once; .before is git-ignored
#   bash benchmarks/before_after.sh                                  # there (carry .before)
#
# Each system runs in its own process, old and new interleaved, and the table at the end gives
# tokens/s, the decode step against its memory-bandwidth floor and the new/old ratio.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ARGS=${ARGS:---model qwen3-8b --requests 64 --max-tokens 4096 --kv-gib 24 --time-limit 60}
SYSTEMS=${SYSTEMS:-zipage-2048 zipage-fullkv}
use() {  # install one tree (editable) as the zipage that python3 imports
  python3 -m pip install -q --no-deps --no-build-isolation -e "$1" >> "$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
}
for system in $SYSTEMS; do
  use .before
  (cd .before && python3 benchmarks/throughput.py $ARGS --systems "$system" --out "$OUT/before_$system.json") 2>&1 \
    | tail -2
  use .
  python3 benchmarks/throughput.py $ARGS --systems "$system" --out "$OUT/after_$system.json" 2>&1 | tail -2
done
python3 - "$OUT" $SYSTEMS <<'EOF'
import json, sys
out, systems = sys.argv[1], sys.argv[2:]
print(f"{'system':14} {'tok/s before':>12} {'after':>8} {'ratio':>6} {'step ms before':>14} {'after':>6} "
      f"{'step/floor before':>17} {'after':>6} {'preempt b/a':>11}")
for s in systems:
    b, a = (json.load(open(f"{out}/{tag}_{s}.json"))["systems"][s] for tag in ("before", "after"))
    print(f"{s:14} {b['tokens_per_s']:12,.0f} {a['tokens_per_s']:8,.0f} {a['tokens_per_s'] / b['tokens_per_s']:6.3f} "
          f"{b['median_decode_step_ms']:14.2f} {a['median_decode_step_ms']:6.2f} "
          f"{b['step_over_floor']:17.2f} {a['step_over_floor']:6.2f} {b['preemptions']:5}/{a['preemptions']}")
EOF
