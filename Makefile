# Two commands do all the set-up on a fresh machine with Python ≥ 3.11:
#   make demo   — the main job on the embedded default data
#   make test   — the test suite
# Each creates or updates the local virtual environment .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_WORKERS ?= auto

.PHONY: demo test venv lint bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.py csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# the serving tests' Triton server: the tritonserver binary inside the nvidia-pytriton wheel, unpacked into
	@# .venv/tritonserver without installing its Python package (which would pin numpy < 2); optional
	@rm -rf $(VENV)/tritonserver $(VENV)/wheels
	@$(BIN)/python -m pip download -q --no-deps "nvidia-pytriton==0.7.0" -d $(VENV)/wheels \
	  && $(BIN)/python -m trojanguard.guard.triton_runtime unpack $(VENV)/wheels/nvidia_pytriton-*.whl $(VENV)/tritonserver \
	  || echo "tritonserver: not installed here (the tests that start a Triton server will skip)"
	@rm -rf $(VENV)/wheels
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/trojanguard demo

# The tests always start from an empty model cache, as on a new machine: zoo models are trained by the run itself.
# They run on one pytest-xdist worker per core (at most 4; TEST_WORKERS=0 runs them in this process): a file's tests
# and the tests of a model-training session fixture stay on one worker (tests/conftest.py), and workers asking for
# the same zoo model wait for one training (the cache entry's lock).
# pytest, not python -m pytest: the latter puts the repository root on sys.path, where kernels/ (our Triton sources)
# would hide the 'kernels' package that transformers imports.
test: $(STAMP)
	@cache=$$(mktemp -d -t trojanguard-cache.XXXXXX); echo "empty model cache: $$cache"; \
	TROJANGUARD_CACHE=$$cache $(BIN)/pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile; status=$$?; rm -rf "$$cache"; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check src tests kernels benchmarks

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf $(VENV) build src/*.egg-info
