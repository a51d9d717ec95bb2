# Two entry points, each doing its own set-up on a fresh machine (Python 3.11):
#   make demo   runs the embedded default pipeline (scikit-learn digits, no data files)
#   make test   runs the test suite
#   make bench  runs the performance suite (benchmarks/run_all.py; TorchCP and MAPIE go into .bench-site only)
# The install order matters: torch first, then torchsort compiled against it (CPU-only: nvcc hidden from
# PATH, since a machine with nvcc but no GPU fails the CUDA build), then the project without build isolation.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.cact-installed
NO_NVCC_PATH := $(shell echo "$$PATH" | tr ':' '\n' | grep -vx /usr/local/bin | grep -vx /usr/local/cuda/bin | paste -sd:)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=70" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -c "import torchsort" 2>/dev/null || PATH="$(NO_NVCC_PATH)" $(PIP) install -q --no-build-isolation torchsort==0.1.10
	$(PIP) install -q "ray[data,train,tune,default]==2.60.0"
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) pipelines/digits_lt.py

test: install
	$(PY) -m pytest -q

# TorchCP and MAPIE are benchmark-only: a separate --target folder on PYTHONPATH, never in the venv. --no-deps since
# TorchCP asks for torch>=2.1 and pip would fetch another torch; its package imports transformers and
# torch_geometric; pandas brings a second NumPy, removed so that the venv's is used (docs/BENCHMARKS.md).
BENCH_SITE ?= .bench-site
BENCH_ARGS ?=
$(BENCH_SITE)/.installed:
	$(PIP) install -q --target $(BENCH_SITE) --no-deps torchcp==1.2.1 mapie==1.6.0
	$(PIP) install -q --target $(BENCH_SITE) tqdm pandas transformers torch_geometric
	rm -rf $(BENCH_SITE)/numpy $(BENCH_SITE)/numpy-*.dist-info $(BENCH_SITE)/numpy.libs
	touch $@

bench: install $(BENCH_SITE)/.installed
	$(PY) benchmarks/run_all.py --bench-site $(BENCH_SITE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache $(BENCH_SITE)
