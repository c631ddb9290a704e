"""Bad input to the compressed path's ops, called through torch.ops.robprune_fast so that the C++
checks fire: wrong dtypes, shapes and contents of the indices and values, and of the layer's
other arguments. Each must raise a RuntimeError naming the argument, never crash: the table runs
first in a subprocess (as tests/test_errors_raise.py does for the other ops), then case by case.

    python -m tests.test_sparse_errors

runs the table and prints one JSON line per case (what the subprocess does).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from robprune_fast.ops.sparse_index import pack_mask
from tests.helpers.op_error_cases import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.robprune_fast


def linear_index(seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack_mask((torch.rand(4, 6, generator=g) > 0.5).float())


def conv_index(seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack_mask((torch.rand(6, 4, 3, 3, generator=g) > 0.5).float())


def with_(index, **change):
    return index._replace(**change)


def linear_cases():
    def fwd(x=None, values=None, bias=None, index=None, out=4, change=None):
        def args(d):
            i = index if index is not None else linear_index()
            i = with_(i, **(change or {}))
            v = values if values is not None else torch.randn(linear_index().nnz)
            return (torch.randn(3, 6) if x is None else x, v, bias, i.row_ptr, i.col, out)
        return args

    def transpose(g=None, index=None, change=None, in_features=6):
        def args(d):
            i = with_(index if index is not None else linear_index(), **(change or {}))
            return (torch.randn(3, 4) if g is None else g, torch.randn(linear_index().nnz), *i.csc, in_features)
        return args

    nnz = linear_index().nnz
    op, op_t = "sparse_linear", "sparse_linear_t"
    return [
        Case("lin-x-int", op, fwd(x=torch.ones(3, 6, dtype=torch.int64)), "x must be float32 or float64"),
        Case("lin-x-3d", op, fwd(x=torch.randn(2, 3, 6)), r"x must be 2-D \(N, in_features\)"),
        Case("lin-values-dtype", op, fwd(values=torch.randn(nnz, dtype=torch.float64)),
             "values must have the dtype of x"),
        Case("lin-values-2d", op, fwd(values=torch.randn(nnz, 1)), "values must be 1-D"),
        Case("lin-values-count", op, fwd(values=torch.randn(nnz + 1)), r"col must have shape \(" + str(nnz + 1)),
        Case("lin-bias-shape", op, fwd(bias=torch.randn(5)), r"bias must have shape \(4,\)"),
        Case("lin-out-negative", op, fwd(out=-1), "out_features must be non-negative"),
        Case("lin-row_ptr-int64", op, fwd(change=dict(row_ptr=linear_index().row_ptr.long())), "row_ptr must be int32"),
        Case("lin-row_ptr-length", op, fwd(out=5), r"row_ptr must have shape \(6,\) \(out_features \+ 1\)"),
        Case("lin-row_ptr-decreasing", op, fwd(change=dict(row_ptr=linear_index().row_ptr.flip(0))),
             "row_ptr must start at 0, never decrease"),
        Case("lin-col-int64", op, fwd(change=dict(col=linear_index().col.long())), "col must be int32"),
        Case("lin-col-range", op, fwd(change=dict(col=linear_index().col + 6)),
             r"col must hold, within each row, strictly increasing columns in \[0, 6\) \(in_features"),
        Case("lin-col-unsorted", op, fwd(change=dict(col=unsorted(linear_index()))),
             "col must hold, within each row, strictly increasing columns"),
        Case("lin_t-g-1d", op_t, transpose(g=torch.randn(4)), r"g must be 2-D \(N, out_features\)"),
        Case("lin_t-col_ptr-length", op_t, transpose(in_features=7), r"col_ptr must have shape \(8,\)"),
        Case("lin_t-row-range", op_t, transpose(change=dict(row=linear_index().row + 4)),
             r"row must hold, within each column, strictly increasing rows in \[0, 4\)"),
        Case("lin_t-csc_to_csr-range", op_t, transpose(change=dict(csc_to_csr=linear_index().csc_to_csr - 1)),
             r"csc_to_csr must hold indices in \[0, "),
        Case("lin_t-csc_to_csr-dtype", op_t, transpose(change=dict(csc_to_csr=linear_index().csc_to_csr.long())),
             "csc_to_csr must be int32"),
        Case("lin_vg-batch", "sparse_linear_values_grad",
             lambda d: (torch.randn(3, 4), torch.randn(2, 6), *linear_index().csc),
             "x must have g's batch size 3"),
        Case("ilin-radius-shape", "sparse_interval_linear",
             lambda d: (torch.randn(3, 6), torch.rand(3, 5), torch.randn(nnz), None, linear_index().row_ptr,
                        linear_index().col, 4, False, False), "radius must have the shape of center"),
        Case("ilin_bwd-grads", "sparse_interval_linear_backward",
             lambda d: (torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 6), torch.rand(3, 6), torch.randn(nnz),
                        linear_index().row_ptr, linear_index().col, *linear_index().csc, False, False, [True] * 4),
             "grad_a and grad_b must have the shape of sparse_interval_linear's outputs"),
    ]


def unsorted(index):
    """col with the first row's first two entries swapped (the row must hold two)."""
    col = index.col.clone()
    row = next(r for r in range(index.shape[0]) if index.row_ptr[r + 1] - index.row_ptr[r] >= 2)
    a = int(index.row_ptr[row])
    col[a], col[a + 1] = index.col[a + 1], index.col[a]
    return col


def conv_cases():
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    nnz = conv_index().nnz

    def fwd(x=None, index=None, geometry=geometry, values=None):
        def args(d):
            i = index if index is not None else conv_index()
            return (torch.randn(2, 4, 5, 5) if x is None else x, torch.randn(nnz) if values is None else values, None,
                    i.row_ptr, i.col, *geometry)
        return args

    def transpose(g=None, input_size=(5, 5), geometry=geometry, col_ptr=None):
        def args(d):
            i = conv_index()
            return (torch.randn(2, 6, 5, 5) if g is None else g, torch.randn(nnz),
                    i.col_ptr if col_ptr is None else col_ptr, i.row, i.csc_to_csr, list(input_size), *geometry)
        return args

    op, op_t = "sparse_conv2d", "sparse_conv2d_t"
    return [
        Case("conv-x-3d", op, fwd(x=torch.randn(4, 5, 5)), r"x must be 4-D \(N, C, H, W\)"),
        Case("conv-kernel", op, fwd(geometry=([3, 0], [1, 1], [1, 1], [1, 1], 1)),
             "kernel_size must be two positive ints"),
        Case("conv-stride", op, fwd(geometry=([3, 3], [0, 1], [1, 1], [1, 1], 1)), "stride must be two positive ints"),
        Case("conv-groups", op, fwd(geometry=([3, 3], [1, 1], [1, 1], [1, 1], 3)),
             "x has 4 channels, which groups = 3 must divide"),
        Case("conv-col-range", op, fwd(geometry=([2, 2], [1, 1], [1, 1], [1, 1], 1)),
             r"col must hold, within each row, strictly increasing columns in \[0, 16\) \(C_in / groups \* kH \* kW\)"),
        Case("conv-small-input", op, fwd(x=torch.randn(2, 4, 1, 1), geometry=([3, 3], [1, 1], [0, 0], [1, 1], 1)),
             "x's spatial size .* is smaller than the dilated kernel"),
        Case("conv_t-input-size", op_t, transpose(input_size=(7, 5)),
             "g's spatial size .* must be the layer's output size"),
        Case("conv_t-col_ptr", op_t, transpose(col_ptr=torch.zeros(5, dtype=torch.int32)),
             "col_ptr must have C_in / groups \\* kH \\* kW \\+ 1 entries"),
        Case("conv_t-g-3d", op_t, transpose(g=torch.randn(6, 5, 5)), r"g must be 4-D"),
        Case("conv_vg-g-shape", "sparse_conv2d_values_grad",
             lambda d: (torch.randn(2, 6, 4, 5), torch.randn(2, 4, 5, 5), conv_index().row_ptr, conv_index().col,
                        *geometry), "g must have sparse_conv2d's output shape"),
        Case("iconv-radius-dtype", "sparse_interval_conv2d",
             lambda d: (torch.randn(2, 4, 5, 5), torch.rand(2, 4, 5, 5, dtype=torch.float64), torch.randn(nnz), None,
                        conv_index().row_ptr, conv_index().col, *geometry, False, False),
             "radius must have the dtype of center"),
        Case("iconv_bwd-grads", "sparse_interval_conv2d_backward",
             lambda d: (torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5), torch.randn(2, 4, 5, 5),
                        torch.rand(2, 4, 5, 5), torch.randn(nnz), conv_index().row_ptr, conv_index().col,
                        *conv_index().csc, *geometry, False, False, [True] * 4),
             "grad_a and grad_b must have the shape of sparse_interval_conv2d's outputs"),
    ]


def gather_cases():
    """sparse_gather(weight, row_ptr, col) and sparse_scatter_(out, values, row_ptr, col) on the
    linear index's (4, 6) weight."""
    nnz = linear_index().nnz

    def gather(weight=None, change=None):
        return lambda d: (torch.randn(4, 6) if weight is None else weight,
                          *with_(linear_index(), **(change or {}))[1:3])

    def scatter(out=None, values=None, change=None):
        return lambda d: (torch.empty(4, 6) if out is None else out, torch.randn(nnz) if values is None else values,
                          *with_(linear_index(), **(change or {}))[1:3])

    op, op_s = "sparse_gather", "sparse_scatter_"
    return [
        Case("gather-weight-int", op, gather(weight=torch.ones(4, 6, dtype=torch.int64)),
             "weight must be float32 or float64"),
        Case("gather-weight-scalar", op, gather(weight=torch.tensor(1.0)), "weight must have at least one dimension"),
        Case("gather-rows", op, gather(weight=torch.randn(5, 6)), r"row_ptr must have shape \(6,\) \(weight.size\(0\)"),
        Case("gather-col-range", op, gather(weight=torch.randn(4, 3, 2).narrow(1, 0, 2)),
             r"col must hold, within each row, strictly increasing columns in \[0, 4\)"),
        Case("gather-col-2d", op, gather(change=dict(col=linear_index().col.view(-1, 1))), "col must be 1-D"),
        Case("gather-col-int64", op, gather(change=dict(col=linear_index().col.long())), "col must be int32"),
        Case("gather-row_ptr-end", op, gather(change=dict(row_ptr=linear_index().row_ptr - 1)),
             "row_ptr must start at 0, never decrease and end at the number of kept weights"),
        Case("scatter-out-strided", op_s, scatter(out=torch.empty(6, 4).t()), "out must be contiguous"),
        Case("scatter-out-int", op_s, scatter(out=torch.empty(4, 6, dtype=torch.int32)), "out must be float32"),
        Case("scatter-values-dtype", op_s, scatter(values=torch.randn(nnz, dtype=torch.float64)),
             "values must have the dtype of out"),
        Case("scatter-values-count", op_s, scatter(values=torch.randn(nnz - 1)), r"col must have shape \(" + str(nnz - 1)),
        Case("scatter-col-unsorted", op_s, scatter(change=dict(col=unsorted(linear_index()))),
             "col must hold, within each row, strictly increasing columns"),
    ]


CASES = linear_cases() + conv_cases() + gather_cases()
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def test_every_case_raises_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "tests.test_sparse_errors"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    started = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("START ")]
    assert proc.returncode == 0, f"died in case {started[-1] if started else None}:\n{proc.stderr[-3000:]}"
    results = {r["id"]: r for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                    if line.startswith("RESULT "))}
    wrong = [c.id for c in CASES if results[c.id]["error"] != "RuntimeError"
             or not re.search(c.match, results[c.id]["message"])]
    assert not wrong, wrong


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_raises(case):
    with pytest.raises(RuntimeError, match=case.match):
        case.call("cpu")


if __name__ == "__main__":
    for case in CASES:
        print(f"START {case.id}", flush=True)
        try:
            case.call("cpu")
            result = dict(id=case.id, error=None, message="")
        except Exception as error:  # every kind, to report what was raised instead
            result = dict(id=case.id, error=type(error).__name__, message=str(error))
        print("RESULT " + json.dumps(result), flush=True)
