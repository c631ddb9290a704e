"""The compressed path's kernels are compiled for three instruction sets (csrc/sparse/sparse_cpu.cpp:
AVX-512, AVX2 + FMA, the x86-64 baseline) and run the best the CPU has. The other two are what
other machines run: the kernels' tests run again in subprocesses forced onto each of them
(ROBPRUNE_SIMD), where this CPU has the instructions. ROBPRUNE_SIMD=generic runs the generic
kernels (csrc/sparse/sparse_generic.h), the ones a CUDA build runs on the GPU: their whole test
files run again that way, index checks and bad input included, so the CUDA kernels' logic is
tested on a machine without a GPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_sparse_linear.py", "tests/test_sparse_conv2d.py", "tests/test_sparse_interval.py"]


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def run_tests(isa: str, *args: str):
    env = dict(os.environ, ROBPRUNE_SIMD=isa, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("isa,flag", [("avx2", "avx2"), ("baseline", None)])
def test_kernels_on_every_instruction_set(isa, flag):
    if flag and not cpu_has(flag):
        pytest.skip(f"this CPU lacks {flag}")
    run_tests(isa, "-k", "matches_twin or layouts or plane_sizes or planes_of or fused or degenerate", *TESTS)


def test_generic_kernels():
    run_tests("generic", *TESTS, "tests/test_sparse_gather.py", "tests/test_sparse_retained_planes.py",
              "tests/test_sparse_errors.py")


def test_unknown_instruction_set_is_refused():
    code = ("import torch, robprune_fast.ops; from robprune_fast.ops import sparse_index as s\n"
            "i = s.pack_mask(torch.ones(2, 2))\n"
            "torch.ops.robprune_fast.sparse_linear(torch.ones(1, 2), torch.ones(4), None, i.row_ptr, i.col, 2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, ROBPRUNE_SIMD="sse9"))
    assert proc.returncode != 0 and "ROBPRUNE_SIMD must be avx512, avx2, baseline or generic" in proc.stderr
