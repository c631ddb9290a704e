"""The masked layer ops of pruned networks: ``masked_linear`` and ``masked_conv2d`` compute
``layer(x)`` with ``weight * mask``. The gradient of the weight is masked (a pruned weight never
receives one); the mask's gradient, when the mask requires grad (HYDRA's importance scores train
through it), is the effective weight's gradient times the weight, dense, so a pruned connection
can come back.

Two paths compute the same thing. ``dense``: ATen's GEMM / convolution on weight * mask, the mask
fused into the one pass that makes the effective weight (once per weight update inside
``weight_cache()``) and into the weight gradient. ``sparse``: kernels over the compressed weight
(``ops.sparse``) that skip pruned weights; they pay off below a density measured per layer shape
and machine (``ops.crossover``). ``path="auto"`` picks by the mask's density; a mask that
requires grad always takes the dense path, which is the one that makes the dense mask gradient,
and so does a device without compressed kernels (a CUDA tensor in a build without the CUDA
kernels), a trace (torch.compile) and a CUDA graph being captured (the compressed path's index
checks wait for the GPU's verdict, which a capture forbids).
"""
from __future__ import annotations

import math

import torch

from .. import reference
from . import sparse
from ._dispatch import OPS, _C, call, has_kernel_for, saving, use_kernel
from .checks import check_layer, check_tensor, conv_input
from .weight_pair import cached_weight_pair

PATHS = ("auto", "dense", "sparse")


def _check(x, weight, bias, mask, weight_dim, path):
    check_tensor(x, "x")
    check_layer(weight, bias, mask, weight_dim, x, "x")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def masked_linear(x, weight, bias=None, mask=None, path="auto"):
    """``F.linear(x, weight * mask, bias)``; x: (*, in_features), weight and mask:
    (out_features, in_features), mask None for an unmasked layer. path: "auto", "dense" or
    "sparse" (see the module docstring)."""
    _check(x, weight, bias, mask, 2, path)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal weight.size(1) (in_features = "
                         f"{weight.shape[1]}), got shape {tuple(x.shape)}")
    if takes_sparse_path(path, "linear", x, (math.prod(x.shape[:-1]), x.shape[-1]), weight, mask, ()):
        return sparse.linear(x, weight, bias, mask)
    return masked_linear_dense(x, weight, bias, mask)


def masked_linear_dense(x, weight, bias=None, mask=None):
    """The dense path of masked_linear, without the Python checks."""
    if use_kernel("masked_linear", x.device):
        return call(OPS.masked_linear, x, weight, bias, mask, cached_weight_pair(weight, mask))
    return reference.masked_linear(x, weight, bias, mask)


def masked_conv2d(x, weight, bias=None, mask=None, stride=1, padding=0, dilation=1, groups=1,
                  path="auto"):
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)`` (zeros padding);
    x: (N, C, H, W) in any memory format. path as in masked_linear."""
    _check(x, weight, bias, mask, 4, path)
    stride, padding, dilation, groups = conv_input(x, "x", weight, stride, padding, dilation,
                                                   groups)
    if takes_sparse_path(path, "conv2d", x, tuple(x.shape), weight, mask, (stride, padding, dilation, groups)):
        return sparse.conv2d(x, weight, bias, mask, stride, padding, dilation, groups)
    return masked_conv2d_dense(x, weight, bias, mask, stride, padding, dilation, groups)


def masked_conv2d_dense(x, weight, bias, mask, stride, padding, dilation, groups):
    """The dense path of masked_conv2d, without the Python checks (geometry as pairs)."""
    if use_kernel("masked_conv2d", x.device):
        return call(OPS.masked_conv2d, x, weight, bias, mask, cached_weight_pair(weight, mask),
                    stride, padding, dilation, groups)
    return reference.masked_conv2d(x, weight, bias, mask, stride, padding, dilation, groups)


def takes_sparse_path(path, op, x, x_shape, weight, mask, geometry) -> bool:
    """Whether a masked layer's call takes the compressed path; op ("linear" or "conv2d"),
    x_shape (a linear layer's as (rows, in_features)) and geometry: the crossover's key. The
    bound engine asks it too, for its interval layers."""
    if path == "dense" or mask is None:
        return False
    if mask.requires_grad and torch.is_grad_enabled():
        if path == "sparse":
            raise ValueError("path='sparse' cannot make the mask's gradient (it is dense); the "
                             "mask requires grad, so use path='dense' or 'auto'")
        return False
    if path == "sparse":
        return True
    if (not has_kernel_for(f"sparse_{op}", x.device.type) or torch.compiler.is_compiling()
            or isinstance(mask, torch._subclasses.FakeTensor)
            or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
        return False
    density = sparse.mask_density(mask)
    return density < 1 and density < sparse.crossover(op, x_shape, weight.shape, geometry, x.dtype, x.device)


# --- fake kernels and autograd ------------------------------------------------------------------------
#
# masked_linear(x, weight, bias, mask, weight_pair) and masked_conv2d(x, weight, bias, mask,
# weight_pair, stride, padding, dilation, groups); their backward ops take (grad, x, weight,
# mask, weight_pair, *geometry, output_mask) and return (grad x, grad weight, grad bias, grad
# mask). weight_pair is the cache of weight_cache(), never differentiated.


def _register(name: str, layer_output) -> None:
    op = f"robprune_fast::masked_{name}"
    backward_op = getattr(OPS, f"masked_{name}_backward")

    @torch.library.register_fake(op)
    def _fake(x, weight, bias, mask, weight_pair, *geometry):
        return layer_output(x, weight, geometry)

    @torch.library.register_fake(f"{op}_backward")
    def _fake_backward(grad, x, weight, mask, weight_pair, *rest):
        *geometry, output_mask = rest
        like = (x, weight, weight.new_empty(weight.shape[0]), weight)
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, output_mask))

    def backward(ctx, grad):
        x, weight, mask, weight_pair = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = [n[0], n[1], n[2], mask is not None and n[3]]
        grads = backward_op(grad, x, weight, mask, weight_pair, *ctx.geometry, need)
        # None for the cached effective weight, then for the geometry.
        return (*[g if wanted else None for g, wanted in zip(grads, need)], None) + (None,) * len(ctx.geometry)

    # Saved: x, weight, mask, weight_pair; then the geometry.
    torch.library.register_autograd(op, backward, setup_context=saving(0, 1, 3, 4, geometry_from=5))


def _linear_output(x, weight, geometry):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _conv2d_output(x, weight, geometry):
    stride, padding, dilation, groups = geometry
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)


if _C is not None:
    _register("linear", _linear_output)
    _register("conv2d", _conv2d_output)
