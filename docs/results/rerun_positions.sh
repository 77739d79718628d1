#!/usr/bin/env bash
# The aligned-positions ablation (README "The comparison protocol"): tok, act and a2t on
# sentiment_remap, N 4 and 8, 5 seeds, with caches that align every query token too
# (--positions query+response), under the protocol of docs/results/rerun.sh (its defaults, lr
# search "descend"). Pair its a2t with the main run's (final/) by (N, seed): the paper's one
# aligned position a row against the query's tokens too. tok does not read activations; it is
# rerun here on the ablation's own caches as a control (same rows, so it should match final/'s).
# Its runs go to their own folders (runs2/<task>/n<N>-s<seed>-query-response/). Resumable like
# rerun.sh, from its own frozen copy of the code (sweeps/code_pos, see _frozen.sh). Start it after rerun.sh has
# finished (both use both cores): about 3-4 hours on 2 CPU cores.
set -u
source "$(dirname "$0")/_frozen.sh" code_pos
echo "=== positions sentiment_remap $(date)"
"${IA2[@]}" sweep --task sentiment_remap --n 4,8 --seeds 0-4 --methods tok,act,a2t --positions query+response \
  --workers "${WORKERS:-2}" --store store2 --runs runs2 --lr-search descend --out final-positions
echo "=== done $(date)"
