"""Build robprune_fast and its compiled operators, robprune_fast._C.

    pip install --no-build-isolation -e .      # against the torch already installed

The C++ kernels are always built. The CUDA kernels are built when torch is a CUDA build and a
CUDA toolkit is found (CUDA_HOME), or whenever FORCE_CUDA=1, which needs no GPU: that is how
CI compile-checks them. FORCE_CUDA=0 builds the CPU kernels only. TORCH_CUDA_ARCH_LIST picks the
architectures (default without a visible GPU: 8.0;9.0). ROBPRUNE_NO_EXT=1 installs the Python
layer alone (every op then runs its pure-PyTorch twin); the Makefile uses it to register an
editable install, then compiles in place with `setup.py build_ext --inplace`.

Sources are found by glob (csrc/**/*.cpp, csrc/**/*.cu, pyext/*.cpp), the same patterns
CMakeLists.txt uses, so no list of files is kept by hand.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in found)


def cuda_wanted():
    force = os.environ.get("FORCE_CUDA")
    toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    if force == "0":
        return False
    if force == "1":
        if torch.version.cuda is None:
            raise SystemExit("FORCE_CUDA=1 needs a CUDA build of torch; this torch is CPU-only")
        if not toolkit:
            raise SystemExit(f"FORCE_CUDA=1 but no CUDA toolkit at CUDA_HOME={CUDA_HOME!r}: "
                             "set CUDA_HOME to the toolkit folder (the one holding bin/nvcc and include/)")
        return True
    return torch.version.cuda is not None and toolkit


def arch_token(arch_list):
    """'8.0;9.0+PTX' -> 'sm80_sm90ptx': one preprocessor token for build_info()."""
    archs = arch_list.replace(" ", ";").split(";")
    return "_".join("sm" + a.lower().replace(".", "").replace("+", "") for a in archs if a)


def extension():
    cpp = sources("csrc/**/*.cpp", "pyext/*.cpp")
    # -fopenmp: at::parallel_for in the kernels is OpenMP in torch's CPU builds; without the
    # flag its pragmas are ignored and every CPU kernel runs on one thread (and `omp simd`
    # does not vectorise). -fno-trapping-math: frees the compiler to vectorise float compares;
    # nothing here reads floating-point exception flags, and no result changes.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not cuda_wanted():
        return CppExtension("robprune_fast._C", cpp, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    defines = [("ROBPRUNE_WITH_CUDA", None), ("ROBPRUNE_CUDA_ARCHS", arch_token(archs))]
    return CUDAExtension("robprune_fast._C", cpp + sources("csrc/**/*.cu"), include_dirs=include_dirs,
                         define_macros=defines,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]})


setup(
    name="robprune_fast",
    version="0.1.0",
    description="Fast kernels and a Python layer for compact, robust (pruned) neural networks",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[] if os.environ.get("ROBPRUNE_NO_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "safetensors", "tqdm", "scikit-learn", "pydantic>=2",
                      "pyyaml", "matplotlib"],
    extras_require={"autoattack": ["pyautoattack"]},
    entry_points={"console_scripts": ["robprune = robprune_fast.cli:main"]},
)
