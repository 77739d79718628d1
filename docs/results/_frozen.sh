# Sourced by each rerun*.sh: freeze a copy of the code into $S/$1 (`git archive`
# of $COMMIT, default the commit that starts it, recorded in $S/$1/COMMIT) so that later edits of
# the working tree never change a run in flight, then set the environment every run uses.
# Defines ROOT, S and IA2 (the CLI from that copy); the caller is in $S afterwards.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
S=${SWEEPS:-$ROOT/sweeps}
mkdir -p "$S"
if [ ! -f "$S/$1/COMMIT" ]; then
  mkdir -p "$S/$1"
  (cd "$ROOT" && git archive "${COMMIT:-HEAD}" ia2cache cli) | tar -x -C "$S/$1"
  (cd "$ROOT" && git rev-parse "${COMMIT:-HEAD}") > "$S/$1/COMMIT"
fi
cd "$S" || exit 1
export PYTHONPATH="$S/$1" OMP_NUM_THREADS=1 IA2CACHE_HOME="$S/home"
IA2=("${PYTHON:-$ROOT/.venv/bin/python}" -m cli)
