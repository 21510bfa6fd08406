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

# The main job on the built-in demo: NPFT with the short CPU recipe, then Q4_0, then llama.cpp
# measures it beside plain RTN Q4_0 and the float model. The noise is our `rtn` variant (the exact
# RTN error, straight-through), which evals/RESULTS.md shows working where the paper's noise does
# not on this model. Nothing beside the clone is needed: the calibration text is `wiki`, the
# Wikipedia articles fetched from PyPI (gensim's test data); the evaluation text is WikiText-2's
# test split where $NPFT_GGUF_WIKITEXT2 names a local copy, else `wiki-heldout`, the articles of
# the same dump that calibration never sees (docs/METHOD.md, "Texts").
CALIB ?= wiki
EVAL_TEXT ?= $(if $(NPFT_GGUF_WIKITEXT2),wikitext2,wiki-heldout)
demo: setup
	@mkdir -p $(DEMO_OUT)
	$(VENV)/bin/npft-gguf convert smollm2-135m --bits 4 --recipe short --noise rtn --calib $(CALIB) \
		--eval-text $(EVAL_TEXT) --chunks 20 -o $(DEMO_OUT)/smollm2-135m-npft-q4_0.gguf --force
	$(VENV)/bin/npft-gguf inspect $(DEMO_OUT)/smollm2-135m-npft-q4_0.gguf

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
