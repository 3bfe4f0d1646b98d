# Two commands do all set-up on a fresh machine:
#   make demo   -- train the digits CNN, quantize it, print float vs INT8 accuracy
#   make test   -- the whole test suite
# Each creates .venv and installs the pinned dependencies on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Reinstalled when the project's build inputs change (dependencies, the compiled binning kernel).
BUILD_INPUTS := pyproject.toml setup.py onnx_backend/_binning.c onnx_backend/_search.c
STAMP  := $(VENV)/.installed-$(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)

.PHONY: demo test bench bench-quick clean

$(STAMP): $(BUILD_INPUTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m torchq.examples.digits --out out/digits

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

# Regenerates docs/BENCHMARKS.md and docs/bench/ (about 30 minutes; trained weights cached in bench/.cache)
bench: $(STAMP)
	$(PY) -m bench.run

# Tiny settings, a minute or two; writes out/bench-quick/
bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

clean:
	rm -rf out .pytest_cache
