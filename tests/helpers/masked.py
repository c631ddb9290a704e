"""Shared checks of the masked layer ops (masked_linear, masked_conv2d) on every path: values
and every gradient (input, weight, bias, mask) against the pure-PyTorch twin, at the sparsities
and layouts a pruned network has."""
import torch

from robprune_fast import ops, reference

# The paths the masked ops can take (see ops.masked).
PATHS = ["dense"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def random_mask(shape, sparsity, dtype, device, generator=None):
    """A binary mask keeping about (1 - sparsity) of the weights (exactly none at 1, all at 0)."""
    if sparsity >= 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    keep = torch.rand(shape, generator=generator, device="cpu") >= sparsity
    return keep.to(dtype=dtype, device=device)


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
