#!/usr/bin/env bash
# The run of "Beyond the paper" (README; issue 18): a2t, act and tok on 3 built-in tasks, N 4 and 8,
# M = 0, 64, 256, 1024 unlabelled queries, 5 seeds, the protocol of docs/results/rerun.sh (its
# defaults, lr search "descend"). Same store and runs folder as rerun.sh, so M = 0 cells that the
# main run already trained are reused, not retrained. Resumable like rerun.sh, from its own frozen
# copy of the code (sweeps/code18, see _frozen.sh).
# Start it after rerun.sh has finished (both use both cores): about 15-20 hours on 2 CPU cores.
set -u
source "$(dirname "$0")/_frozen.sh" code18
for t in antonyms first_letter sentiment_remap; do
  echo "=== unlabelled $t $(date)"
  "${IA2[@]}" sweep --task "$t" --n 4,8 --unlabelled 0,64,256,1024 --seeds 0-4 --methods tok,act,a2t \
    --workers "${WORKERS:-2}" --store store2 --runs runs2 --lr-search descend --out final-unlabelled
done
echo "=== done $(date)"
