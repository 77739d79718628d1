#!/usr/bin/env bash
# Issue 13's dev-size check: antonyms under rerun.sh's protocol with D = N//2 dev rows (--dev
# half, the old split) instead of 16, to show how the conclusion moves with D. Its own frozen
# copy of the code (sweeps/code_dev, see _frozen.sh): the copy rerun.sh runs put these runs in
# the default's run folders (the dev rows are part of the cache), where distill refused them.
# Resumable like rerun.sh; about 3-4 hours on 2 CPU cores.
set -u
source "$(dirname "$0")/_frozen.sh" code_dev
echo "=== dev-half antonyms $(date)"
"${IA2[@]}" sweep --task antonyms --n 4,8,16 --seeds 0-4 --methods tok,act,a2t,tna,tok_icl \
  --workers "${WORKERS:-2}" --store store2 --runs runs2 --lr-search descend --dev half --out final-devhalf
echo "=== done $(date)"
