#!/usr/bin/env bash
# The sweep that replaces README "Results" (issue 13's protocol), resumable: rerun it after an
# interruption and finished cells are skipped, failed ones retried. It runs a frozen copy of the
# code (sweeps/code, see _frozen.sh), so that later edits of the working tree never change a run
# in flight. About 25-30 hours on 2 CPU cores (WORKERS=2); results in sweeps/final*/, then `ia2cache report`.
# The dev-size check (--dev half) is rerun_devhalf.sh: this frozen code put its runs in the
# default's run folders, where distill refused them. queue.sh runs every script in order.
set -u
source "$(dirname "$0")/_frozen.sh" code
COMMON=(--n 4,8,16 --seeds 0-4 --methods tok,act,a2t,tna,tok_icl --workers "${WORKERS:-2}" --store store2 --runs runs2)
for t in antonyms first_letter sentiment_remap capitals; do
  echo "=== final $t $(date)"
  "${IA2[@]}" sweep --task "$t" "${COMMON[@]}" --lr-search descend --out final
done
echo "=== fullgrid antonyms $(date)"
"${IA2[@]}" sweep --task antonyms "${COMMON[@]}" --lr-search grid --out final-fullgrid
echo "=== done $(date)"
