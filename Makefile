# The two README commands and their set-up.
#   make demo   the main job (robprune run configs/demo.yaml) on the embedded digits data
#   make test   build (reusing an earlier build) and run the tests
# On a fresh machine both create .venv and install torch 2.14.1 / torchvision 0.29.1 first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := torch==2.14.1 torchvision==0.29.1 numpy pytest expecttest ninja pybind11 \
            scikit-learn tqdm safetensors pydantic pyyaml matplotlib

# The CUDA kernels compile without a GPU when a toolkit is found; FORCE_CUDA=0 skips them.
CUDA_HOME ?= $(shell scripts/cuda_home.sh)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
FORCE_CUDA ?= $(if $(CUDA_HOME),1,0)
BUILD_ENV := CUDA_HOME="$(CUDA_HOME)" FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2

.PHONY: all build test demo bench cmake compat clean

all: test

$(VENV)/.packages: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PACKAGES)
	touch $@

# The editable install registers the package (metadata, path) without compiling anything;
# `build` compiles in place with ninja, which recompiles only what changed since last time.
$(VENV)/.editable: $(VENV)/.packages setup.py
	ROBPRUNE_NO_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.editable
	$(BUILD_ENV) $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -c "import robprune_fast, json; print(json.dumps(robprune_fast.build_info()))"
	$(PY) -m pytest -q tests

demo: build
	$(VENV)/bin/robprune run configs/demo.yaml

bench: build
	$(PY) -m robprune_fast.bench

# The CMake build of the same sources (CPU kernels; setup.py compiles the CUDA ones), and a
# smoke test of the module it makes.
cmake: $(VENV)/.packages
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCUDAToolkit_ROOT=$(CUDA_HOME))
	cmake --build build-cmake
	cd build-cmake && ../$(PY) -c "import torch, _C; \
	  c, r, w = torch.randn(4, 5), torch.rand(4, 5), torch.randn(3, 5); \
	  a, b = torch.ops.robprune_fast.interval_linear(c, r, w, None, None, None, True, True); \
	  assert bool((a <= b).all()), 'lower > upper'; print('cmake build OK:', _C.build_info())"

# The GPU machines' torch (2.11) in its own venv: the extension builds against it (the CUDA
# kernels too, as `build` compiles them) and its failing checks raise. A GPU session would find
# a break only after minutes of its scarce time.
COMPAT_PACKAGES := torch==2.11.0 numpy pytest expecttest ninja pybind11 setuptools safetensors
compat:
	test -x .venv-compat/bin/python || $(PYTHON) -m venv .venv-compat
	.venv-compat/bin/python -m pip install --quiet $(COMPAT_PACKAGES)
	$(BUILD_ENV) .venv-compat/bin/python setup.py --quiet build --build-base build-compat
	PYTHONPATH=$$(echo $(CURDIR)/build-compat/lib*) OMP_NUM_THREADS=1 .venv-compat/bin/python scripts/throw_check.py
	PYTHONPATH=$$(echo $(CURDIR)/build-compat/lib*) OMP_NUM_THREADS=1 .venv-compat/bin/python -m pytest -q \
	  -p no:cacheprovider tests/test_errors_raise.py tests/test_sparse_errors.py tests/test_interval_linear.py \
	  tests/test_sparse_linear.py

clean:
	rm -rf build build-cmake build-compat python/robprune_fast/*.so
