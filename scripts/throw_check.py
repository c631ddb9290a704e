"""Does a failed C++ check raise a Python error, or crash the process? Run by gpu_check.sh.

On the one GPU machine this was tried on, every failing TORCH_CHECK in robprune_fast's kernels
killed the process (segmentation fault) instead of raising. This tells apart the extension's
own paths from a one-function inline extension built by the same compiler: if the inline one
crashes too, the machine's toolchain is at fault, not this project's code. Each case runs in
its own process; exits non-zero if any case crashed. tests/test_errors_raise.py runs every op's
failing checks the same way, in one subprocess.
"""
import subprocess
import sys
import textwrap

INLINE = textwrap.dedent('''
    import os, torch
    from torch.utils.cpp_extension import load_inline
    os.makedirs("/tmp/throw_check", exist_ok=True)
    src = """
    #include <torch/extension.h>
    at::Tensor boom(const at::Tensor& x) { TORCH_CHECK(x.dim() == 7, "x must be 7-D, got ", x.dim()); return x; }
    TORCH_LIBRARY(throw_check, m) { m.def("boom(Tensor x) -> Tensor"); }
    TORCH_LIBRARY_IMPL(throw_check, CPU, m) { m.impl("boom", &boom); }
    """
    mod = load_inline("throw_check", cpp_sources=[src], functions=["boom"],
                      build_directory="/tmp/throw_check")
''')
OURS = "import torch, robprune_fast.ops\n"
CASES = {
    "aten": "import torch; torch.mm(torch.randn(2, 3), torch.randn(2, 3))",
    "ours through the autograd layer": OURS + "torch.ops.robprune_fast.masked_weight_pair(torch.randn(3, 4), torch.ones(4, 3))",
    "ours below autograd": OURS + "with torch._C._AutoDispatchBelowAutograd():\n"
                                  "    torch.ops.robprune_fast.masked_weight_pair(torch.randn(3, 4), torch.ones(4, 3))",
    "inline, pybind11": INLINE + "mod.boom(torch.randn(2))",
    "inline, torch.ops": INLINE + "torch.ops.throw_check.boom(torch.randn(2))",
    "inline, python autograd": INLINE + 'torch.library.register_autograd("throw_check::boom", lambda ctx, g: g)\n'
                                        "torch.ops.throw_check.boom(torch.randn(2))",
}

crashed = False
for name, code in CASES.items():
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                       text=True, timeout=300)
    last = (p.stderr.strip().splitlines() or [""])[-1]
    raised = p.returncode == 1 and "RuntimeError" in last
    crashed |= not raised
    print(f"{name:32s} {'raised' if raised else 'CRASHED'} (rc {p.returncode}): {last[:140]}", flush=True)
    if not raised:
        print(textwrap.indent(p.stderr[-1200:], "    | "))
sys.exit(1 if crashed else 0)
