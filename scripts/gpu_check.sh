#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with a CUDA GPU whose python3 already holds torch
# (and may reach no package registry): build the extension with its CUDA kernels for that GPU,
# run the test suite (every CUDA test included), benchmark the kernels and the bound engine, and
# run the CUDA op tests under compute-sanitizer. Each stage has its own time limit and its log
# goes to $OUT/check.log; a failed build ends the check, any other failure does not.
#   OUT=runs/gpu_check bash scripts/gpu_check.sh [check|speed|pipeline|all]
# A lent GPU comes with about 15 minutes and 10 per command, so the check runs in parts, one
# command each, the build kept between them while the machine stays warm:
#   check     build, errors-raise check, the CUDA tests, compute-sanitizer   (about 8 min)
#   speed     kernel, sparse and bound-engine benchmarks                      (about 8 min)
#   pipeline  the pruning pipeline on CIFAR-10 for as long as it is given; needs the archive
#             at .data/cifar10-jpeg.tar.gz (carried; git-excluded) and pydantic/pyyaml
#             (.whl/, carried, when the machine lacks them)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
case $PART in check|speed|pipeline|all) ;; *) echo "part must be check, speed, pipeline or all, got $PART" >&2; exit 2;; esac
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
  return $rc
}

# Wheels carried in .whl/ (e.g. expecttest, which opcheck's test utilities import).
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage info 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
  $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), \
  \"cxx11 abi:\", torch.compiled_with_cxx11_abi())'; \
  c=\$($PY -c 'from torch.utils.cpp_extension import get_cxx_compiler as g; print(g())'); \$c --version | head -1; \
  echo '#include <string>' | \$c -x c++ -dM -E - | grep -m1 _GLIBCXX_USE_CXX11_ABI; \
  w=\$(command -v \$c); if head -c 2 \"\$w\" | grep -q '#!'; then head -n 30 \"\$w\"; else echo \"\$w: a binary\"; fi"

# Compiled in place and found through PYTHONPATH: there `pip install -e .` hands the build to a
# nested pip that wants setuptools from a registry.
ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
stage build 360 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
  MAX_JOBS="$(nproc)" $PY setup.py --quiet build_ext --inplace || { tail -n 60 "$LOG"; exit 1; }
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
stage build_info 60 $PY -c "import robprune_fast as r, json; i = r.build_info(); print(json.dumps(i)); \
  assert i.get('cuda'), 'the CUDA kernels were not built'"

if want check; then
# A failed check must raise, not crash (it crashed on the first GPU machine: see BENCHMARKS.md).
# Unwinder or C++ runtime copies linked into the module would explain it; list any.
stage unwinder 30 bash -c "nm -D --defined-only python/robprune_fast/_C*.so | \
  grep -E '_Unwind_RaiseException|__gxx_personality_v0|__cxa_throw' || echo 'none defined in the module'"
stage throw_check 120 $PY scripts/throw_check.py
# The CUDA variants of every test (the CPU ones ran in CI), then the crash test of every op.
stage tests_cuda 180 env OMP_NUM_THREADS=1 $PY -m pytest -q -rfEs -p no:cacheprovider -k cuda tests
stage errors_raise 60 $PY -m pytest -q -rfEs -p no:cacheprovider tests/test_errors_raise.py
# Out-of-bounds accesses and races the value checks cannot see (where the runtime supports it).
# The compressed path's tests add ~150 float32 CUDA cases (linear, conv plane sizes, interval, gather/scatter).
stage sanitizer 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest -q -x -p no:cacheprovider -k "cuda and float32" \
  tests/test_interval_linear.py tests/test_interval_conv2d.py tests/test_input_box.py \
  tests/test_relu_box_.py tests/test_crown_relu_backward.py tests/test_crown_linear_backward.py \
  tests/test_crown_conv2d_backward.py tests/test_masked_weight_pair.py tests/test_degenerate_shapes.py \
  tests/test_sparse_linear.py tests/test_sparse_conv2d.py tests/test_sparse_interval.py \
  tests/test_sparse_gather.py
fi

if want speed; then
stage bench 150 $PY -m robprune_fast.bench --device cuda --sections ibp --json "$OUT/bench_cuda.json"
# The compressed path's CUDA kernels against cuDNN / cuBLAS dense, and the crossover auto measures.
stage bench_sparse 120 $PY -m robprune_fast.bench --device cuda --sections sparse --json "$OUT/bench_cuda_sparse.json"
stage bench_b512 120 $PY -m robprune_fast.bench --device cuda --batch 512 --sections ibp --json "$OUT/bench_cuda_b512.json"
stage bounds_time 120 $PY benchmarks/bounds_time.py --device cuda --repeats 10 \
  --out "$OUT/bounds_time_cuda.json"
stage pruned_step 60 $PY benchmarks/pruned_ibp_step.py --repeats 10 --out "$OUT/pruned_ibp_step_cuda.json"
fi

if want pipeline; then
# The paper's experiment on the GPU, shortened to what one command's time allows.
stage pipeline "${PIPELINE_SECONDS:-540}" $PY -m robprune_fast.cli run configs/cifar10_ibp_cnn_small.yaml \
  --set data.source=.data/cifar10-jpeg.tar.gz --set device=cuda --set out_dir="$OUT/pipeline" \
  --set pretrain.epochs="${PIPELINE_EPOCHS:-10}" --set finetune.epochs=3
fi

tail -n 40 "$LOG"
exit $status
