#!/bin/bash
# The effect of --dtype int8 on training: antonyms, N=8, seeds 0-2, a2t (lr 1e-3 both phases, at most
# 200 steps a phase) from a bf16 cache and from an int8 cache, each evaluated on 100 eval rows, and
# both adapters' similarity to the bf16 teacher on those rows. ~8 min a seed on 2 CPU cores.
# Then: python -m benchmarks.int8_effect_summary "$W" (writes benchmarks/results/int8_effect.json).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-/tmp/ia2-int8}
cd "$ROOT"
export OMP_NUM_THREADS=1
S=$W/store
O=$W/out
mkdir -p "$O"
CLI="${PYTHON:-.venv/bin/python} -m cli"
key() { python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['key'])" "$1"; }
for seed in ${SEEDS:-0 1 2}; do
  for dtype in bf16 int8; do
    $CLI collect --task antonyms --n 8 --seed $seed --dtype $dtype --store $S --json > $O/collect-$dtype-$seed.json 2>$O/collect-$dtype-$seed.err
    $CLI distill --cache "$(key $O/collect-$dtype-$seed.json)" --store $S --method a2t --lr 1e-3 --lr2 1e-3 --max-steps 200 --seed $seed --out $O/a2t-$dtype-$seed --json > $O/distill-$dtype-$seed.json 2>$O/distill-$dtype-$seed.err
    $CLI eval --task antonyms --adapter $O/a2t-$dtype-$seed --n-eval 100 --json > $O/eval-$dtype-$seed.json 2>$O/eval-$dtype-$seed.err
  done
  $CLI collect --task antonyms --n 8 --seed $seed --split eval --n-eval 100 --dtype bf16 --store $S --json > $O/collect-eval-$seed.json 2>$O/collect-eval-$seed.err
  $CLI analyze similarity --cache "$(key $O/collect-eval-$seed.json)" --store $S --adapter $O/a2t-bf16-$seed --adapter $O/a2t-int8-$seed --out $O/analysis-$seed --json > $O/analyze-$seed.json 2>$O/analyze-$seed.err
done
