"""Shared checks of the masked layer ops (masked_linear, masked_conv2d) on every path: values
and every gradient (input, weight, bias, mask) against the pure-PyTorch twin, at the sparsities
and layouts a pruned network has."""
import contextlib

import pytest
import torch

from robprune_fast import ops, reference

# The paths the masked ops can take (see ops.masked).
PATHS = ["dense", "sparse"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


@contextlib.contextmanager
def full_float32():
    """cuDNN's and cuBLAS's float32 in full precision, restored on exit: torch's default rounds a
    GPU's float32 convolutions to TF32 (~1e-3 off), which the twins would then be, and the
    compressed path's kernels never are."""
    knobs = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value


@pytest.fixture
def exact_twins():
    """full_float32 around a whole test, for tests that compute their references themselves."""
    with full_float32():
        yield


def random_mask(shape, sparsity, dtype, device, generator=None):
    """A binary mask keeping about (1 - sparsity) of the weights (exactly none at 1, all at 0)."""
    if sparsity >= 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    keep = torch.rand(shape, generator=generator, device="cpu") >= sparsity
    return keep.to(dtype=dtype, device=device)


@full_float32()
def compare(name, x, weight, bias, mask, options, path, dtype, mask_grad=True):
    """ops.<name>(..., path=path) against reference.<name>: the output, and the gradients of x,
    weight, bias and (when mask_grad) the mask under a random cotangent. The gradient of a
    pruned weight must be exactly zero."""
    op, twin = getattr(ops, name), getattr(reference, name)
    leaves = lambda: [t.detach().clone().requires_grad_(True) if t is not None else None
                      for t in (x, weight, bias, mask)]
    a, b = leaves(), leaves()
    if not mask_grad and mask is not None:
        a[3].requires_grad_(False)
        b[3].requires_grad_(False)
    got = op(*a, **options, path=path)
    want = twin(*b, **options)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    cot = torch.randn_like(want)
    got.backward(cot)
    want.backward(cot)
    for name_, ta, tb in zip(("x", "weight", "bias", "mask"), a, b):
        if tb is not None and tb.requires_grad:
            torch.testing.assert_close(ta.grad, tb.grad, **TOL[dtype], msg=f"grad of {name_}")
    if mask is not None:
        assert (a[1].grad[mask == 0] == 0).all(), "a pruned weight received a gradient"


# --- the compressed path's ops (tests/test_sparse_*.py) -------------------------------------------


def compressed(weight, mask):
    """(SparseIndex, values) of weight under a binary mask, values a leaf that requires grad."""
    from robprune_fast.ops.sparse_index import pack_mask

    index = pack_mask(mask)
    return index, torch.take(weight.detach(), index.flat_index).requires_grad_(True)


@full_float32()
def compare_op(op, twin, args, dtype, grads=True):
    """op(*args) against twin(*args): outputs, and the gradients of every floating tensor argument
    (leaves made here) under random cotangents."""
    def leaves():
        return [a.detach().clone().requires_grad_(grads) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
    a, b = leaves(), leaves()
    got, want = op(*a), twin(*b)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[dtype])
    if not grads:
        return got
    cots = [torch.randn_like(w) for w in want]
    torch.autograd.backward(list(got), cots)
    torch.autograd.backward(list(want), cots)
    for i, (ta, tb) in enumerate(zip(a, b)):
        if isinstance(ta, torch.Tensor) and ta.requires_grad:
            torch.testing.assert_close(ta.grad, tb.grad, **TOL[dtype], msg=f"grad of argument {i}")
    return got
