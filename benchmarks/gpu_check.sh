#!/usr/bin/env bash
# GPU check for ia2cache on the lent machine: one CUDA GPU, Python 3.12 with torch (CUDA),
# transformers, peft, safetensors, numpy, typer, rich, hypothesis and pytest preinstalled, and
# NO network. What the machine lacks (nnsight, zarr, numcodecs, ...) comes from the wheel bundle;
# the models are random-weight ones built from shipped configs (no weights travel).
#
# Before, here (PyPI reachable):   make gpu-bundle          # fills gpu_bundle/, refused above 60 MiB
# On the device (the `run` tool):  command  "bash benchmarks/gpu_check.sh"
#                                  carry    ["gpu_bundle"]
#                                  timeout_s 540            # the script stops itself at 480 s
# The results come back under $OUT: gpu_check.json, stage-*.json, gpu_check.log.
#
# What it does, in order (the whole script runs under `timeout 480`; GPU_CHECK_TIMEOUT changes it):
#   1. installs from the bundle the wheels this interpreter lacks, offline:
#      pip install --no-index --no-deps --target $GPU_CHECK_SITE (benchmarks/gpu_bundle.py install),
#      then PYTHONPATH=$GPU_CHECK_SITE:<repo>; the machine's own torch and transformers are used;
#   2. prints nvidia-smi and where python finds each package;
#   3. python -m benchmarks.gpu_check: correctness (bf16 collect == hooked forward, verify,
#      distill), collect vs the reference strategy, capture overhead vs bare generate,
#      utilisation vs the bf16 matmul peak, loader feeding an act distill step, peak memory;
#      on random:smollm2-135m and random:llama-3.2-1b, each stage in its own process.
# A failing step is reported and the next one still runs; the exit status is 1 if any failed.
# Results go to $OUT (when set) and benchmarks/results/gpu/.
#
# Environment: PYTHON (default: the first of python3, python with torch), GPU_BUNDLE (default
# gpu_bundle), GPU_CHECK_SITE (default $TMPDIR/ia2cache-gpu-site), IA2CACHE_HOME (default a fresh
# temp dir), GPU_CHECK_ARGS (more driver flags; the CPU simulation passes
# "--preset sim --device cpu --no-require-cuda --models random:DIR").
#
# Launch, from anywhere: bash benchmarks/gpu_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

if [[ -z "${IA2_GPU_CHECK_INNER:-}" ]]; then
    # Outer level: bound everything by one timeout (it kills the whole process group), then
    # hand back what was produced, whatever happened: the run writes into a fresh folder, copied
    # to benchmarks/results/gpu/ and to $OUT at the end (also after a timeout).
    limit="${GPU_CHECK_TIMEOUT:-480}"
    run_dir="$(mktemp -d "${TMPDIR:-/tmp}/ia2cache-gpu-run.XXXXXX")"
    IA2_GPU_CHECK_INNER=1 IA2_GPU_CHECK_LIMIT="$limit" IA2_GPU_CHECK_RUN="$run_dir" \
        timeout "$limit" bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$run_dir/gpu_check.log"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 ]] && echo "gpu_check: stopped by timeout $limit" | tee -a "$run_dir/gpu_check.log"
    for dest in "$REPO/benchmarks/results/gpu" ${OUT:+"$OUT"}; do
        mkdir -p "$dest" && cp "$run_dir"/* "$dest"/
    done
    echo "gpu_check: results in $REPO/benchmarks/results/gpu${OUT:+ and $OUT}:" $(ls "$run_dir")
    rm -rf "$run_dir"
    exit "$rc"
fi

export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export PIP_BREAK_SYSTEM_PACKAGES=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
t_start=$SECONDS
tmp="${TMPDIR:-/tmp}"
BUNDLE="${GPU_BUNDLE:-$REPO/gpu_bundle}"
SITE="${GPU_CHECK_SITE:-$tmp/ia2cache-gpu-site}"
export IA2CACHE_HOME="${IA2CACHE_HOME:-$(mktemp -d "$tmp/ia2cache-gpu-home.XXXXXX")}"
unset PYTHONPATH

if [[ -z "${PYTHON:-}" ]]; then
    for cand in python3 python python3.12; do
        if command -v "$cand" >/dev/null && "$cand" -c 'import torch' 2>/dev/null; then
            PYTHON="$cand"
            break
        fi
    done
fi
PY="${PYTHON:-python3}"
echo "=== [$((SECONDS - t_start)) s] python: $(command -v "$PY") ($("$PY" -V 2>&1)); bundle: $BUNDLE"

echo "=== [$((SECONDS - t_start)) s] install the bundle into $SITE (offline)"
if ! "$PY" -m benchmarks.gpu_bundle install --dir "$BUNDLE" --target "$SITE"; then
    echo "=== install: FAILED; nothing else can run"
    exit 1
fi
export PYTHONPATH="$SITE:$REPO"

echo "=== [$((SECONDS - t_start)) s] gpu"
nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
"$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "nnsight", "zarr", "numcodecs", "ia2cache"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<13} {getattr(mod, '__version__', '?'):<12} {mod.__file__}")
    except Exception as exc:
        print(f"{name:<13} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
EOF

# What is left of the limit, less a margin for writing the results.
budget=$(( ${IA2_GPU_CHECK_LIMIT:-480} - (SECONDS - t_start) - 20 ))
echo "=== [$((SECONDS - t_start)) s] checks (budget ${budget} s)"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of flags
"$PY" -m benchmarks.gpu_check --budget "$budget" --out "$IA2_GPU_CHECK_RUN" ${GPU_CHECK_ARGS:-}
rc=$?
echo "=== done in $((SECONDS - t_start)) s, exit $rc"
exit $rc
