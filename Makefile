# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv,
# install the pinned stack once (a stamp file remembers), and need nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo-out

# llama.cpp's CPU kernels (llama-cpp-python compiles them): on x86-64 a portable AVX2/FMA/F16C
# build, not -march=native, because a CPU that reports AMX inside a VM that does not enable it
# makes a native build die with SIGILL (tileloadd) on every Q4_0/Q8_0 file. The wheel is built
# once per flag set into the artefact cache and installed from there: pip's own wheel cache is
# keyed by the sdist alone and would hand back a native build. Override with LLAMA_CMAKE=...
LLAMA_CPP   := $(shell grep -m1 '^llama-cpp-python==' requirements.lock)
LLAMA_CMAKE ?= $(if $(filter x86_64 amd64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON,)
CACHE       := $(or $(NPFT_GGUF_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/npft-gguf)
FLAGS_ID    := $(shell echo '$(LLAMA_CPP) $(LLAMA_CMAKE)' | sha256sum | cut -c1-12)
WHEELS      := $(CACHE)/wheels/$(FLAGS_ID)
STAMP       := $(VENV)/.npft-installed-$(FLAGS_ID)

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
		echo "building $(LLAMA_CPP) once ($(or $(LLAMA_CMAKE),default flags)) into $(WHEELS): several minutes"; \
		mkdir -p $(WHEELS) && CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(WHEELS).part "$(LLAMA_CPP)" \
		&& mv $(WHEELS).part/llama_cpp_python-*.whl $(WHEELS)/ && rm -rf $(WHEELS).part; }
	$(PY) -m pip install -q --find-links $(WHEELS) -r requirements.lock
	$(PY) -m pip install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-*.whl
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.npft-installed*
	@touch $@

test: setup
	$(VENV)/bin/pytest -q

# The main job on the built-in demo: NPFT with the short CPU recipe, then Q4_0 with importance-
# weighted scales, then llama.cpp measures it beside plain RTN Q4_0, the untuned model quantized
# with the same importance matrix, and the float model. Every choice is convert's default, which is
# what evals/RESULTS.md measures closest to the float model: --objective kl (the float model as
# teacher), --noise rtn (the exact RTN error, straight-through), --method auto (= npft+imatrix at
# Q4_0). Nothing beside the clone is needed: the calibration text is `wiki`, the
# Wikipedia articles fetched from PyPI (gensim's test data); the evaluation text is WikiText-2's
# test split where $NPFT_GGUF_WIKITEXT2 names a local copy, else `wiki-heldout`, the articles of
# the same dump that calibration never sees (docs/METHOD.md, "Texts").
CALIB ?= wiki
EVAL_TEXT ?= $(if $(NPFT_GGUF_WIKITEXT2),wikitext2,wiki-heldout)
demo: setup
	@mkdir -p $(DEMO_OUT)
	$(VENV)/bin/npft-gguf convert smollm2-135m --bits 4 --recipe short --calib $(CALIB) \
		--eval-text $(EVAL_TEXT) --chunks 20 -o $(DEMO_OUT)/smollm2-135m-npft-q4_0.gguf --force
	$(VENV)/bin/npft-gguf inspect $(DEMO_OUT)/smollm2-135m-npft-q4_0.gguf

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
