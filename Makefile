# One-command entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
# The torch version CI tests, in whichever build pip's index gives (CI's wheel source: the CPU
# one; PyPI's Linux wheel includes CUDA). `make clean test TORCH=torch` takes the newest.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test test-fast demo bench-gpu clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# The whole suite on the CPU: Triton kernels under the interpreter, benchmarks in quick mode.
test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Skips the slow tests (torch.compile on the CPU, CLI end to end).
test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# Train the CPU demo on the embedded digits and write sample grids under runs/.
demo: venv
	$(BIN)/liquiddiff train

# On a machine with one CUDA GPU: gpu-marked tests, compute-sanitizer, then the benchmark
# report (table, JSON, plot) written to $(OUT). See benchmarks/README.md.
OUT ?= gpu_report
bench-gpu:
	PYTHONPATH=. bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
