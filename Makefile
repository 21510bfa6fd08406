# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv,
# install the pinned stack once (a stamp file remembers), and need nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.npft-installed
DEMO_OUT ?= demo-out

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: setup
	$(VENV)/bin/pytest -q

# The main job on the built-in demo. Until `convert` (NPFT) lands this is the RTN baseline:
# export SmolLM2-135M to F32 and Q4_0, then measure Q4_0 against F32 in llama.cpp.
demo: setup
	@mkdir -p $(DEMO_OUT)
	$(VENV)/bin/npft-gguf export smollm2-135m -o $(DEMO_OUT)/smollm2-135m-f32.gguf --type f32 --force
	$(VENV)/bin/npft-gguf export smollm2-135m -o $(DEMO_OUT)/smollm2-135m-q4_0.gguf --type q4_0 --force
	$(VENV)/bin/npft-gguf inspect $(DEMO_OUT)/smollm2-135m-q4_0.gguf
	$(VENV)/bin/npft-gguf compare $(DEMO_OUT)/smollm2-135m-q4_0.gguf --ref $(DEMO_OUT)/smollm2-135m-f32.gguf \
		--chunks 10 --reps 2 -o $(DEMO_OUT)/report.md --plot $(DEMO_OUT)/report.png

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
