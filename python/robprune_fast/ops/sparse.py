"""The compressed path of the masked layers: products over a pruned weight's kept values only
(csrc/sparse), so their cost scales with the weights a mask keeps.

``linear`` and ``conv2d`` are masked_linear / masked_conv2d's path="sparse" (ops.masked calls
them), ``interval_linear`` and ``interval_conv2d`` the interval (IBP) layers over a compressed
weight: one pass over the kept weights makes both the centre W c + b and the radius |W| r. All
pack the mask once per mask version and gather the values from the weight (``sparse_index``):
they are differentiable in the input, the weight (a pruned weight's gradient is exactly 0) and
the bias; the mask's gradient is the dense path's job.

The ops themselves (torch.ops.robprune_fast.sparse_*, schemas in pyext/module.cpp) take the
values and indices; here are their fake kernels and autograd formulas, each op's twin is in
``reference.py``. The kernels run on CPU tensors and, in a build with the CUDA kernels, on CUDA
tensors (the generic kernels of csrc/sparse/sparse_generic.h); where the build has none for the
device (a CPU-only build given CUDA tensors, no extension at all) the ops run their twins.
``crossover`` decides when path="auto" takes this path (on a GPU, only where it measured faster
than the dense cuBLAS / cuDNN layer).
"""
from __future__ import annotations

import weakref

import torch
from torch._prims_common import suggest_memory_format

from .. import reference
from ._dispatch import OPS, _C, call, saving, use_kernel
from .checks import check_box, check_layer, conv_input
from .crossover import crossover  # noqa: F401  (ops.sparse.crossover: the path choice)
from .sparse_index import (SparseIndex, csc_of, csr_of, dense_gradient, gather_values, index_of,  # noqa: F401
                           mask_density, mask_index, pack_mask)


def _conv_args(weight, stride, padding, dilation, groups):
    return list(weight.shape[2:]), list(stride), list(padding), list(dilation), groups


# --- the masked layers --------------------------------------------------------------------------------


def linear(x, weight, bias, mask, kept=None):
    """``F.linear(x, weight * mask, bias)`` on the compressed path; x (*, in_features), arguments
    checked by ops.masked_linear. kept: (values, index) of a compressed layer
    (nn.CompressedLinear), whose values are the parameter: used as they are (weight and mask
    are then not read), where without it the mask is packed (once per version) and the values
    gathered from the weight."""
    x2 = x.reshape(-1, x.shape[-1])
    trained = weight if kept is None else kept[0]  # what autograd may ask the gradient of
    if _trains_as_one_node(x2, trained):
        y = _TrainedLinear.apply(x2, trained, bias, mask_index(mask) if kept is None else kept[1], kept is None)
    else:
        values, index = _values_index(weight, mask, kept)
        y = sparse_linear(x2, values, bias, index)
    return y.view(*x.shape[:-1], y.shape[1])


def _values_index(weight, mask, kept):
    """(values, index) of the compressed weight: kept (detached without grad: the kernels keep
    their input for a backward only for values that require grad), or gathered from weight at
    mask's ones."""
    if kept is not None:
        return kept_values(kept[0]), kept[1]
    index = mask_index(mask)
    return gather_values(weight, index), index


def kept_values(values):
    """A compressed layer's kept values as a call passes them: detached where no graph is built
    (inference, verification), so that the kernels keep nothing for a backward."""
    return values if torch.is_grad_enabled() else values.detach()


def _trains_as_one_node(x, weight) -> bool:
    """Whether a compressed linear layer takes _TrainedLinear: a weight autograd will ask the
    gradient of, the kernels, and no trace or functorch transform (which take the ops, their
    autograd registered with torch.library)."""
    return (torch.is_grad_enabled() and weight.requires_grad and use_kernel("sparse_linear", x.device)
            and use_kernel("sparse_gather", weight.device) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch._C._functorch.is_functorch_wrapped_tensor(weight))


class _TrainedLinear(torch.autograd.Function):
    """A compressed linear layer whose weight trains, as one autograd node. gather: the weight is
    the dense one (a masked layer's): forward gathers the kept values and runs the product,
    backward is sparse_linear's formula and sparse_gather's (dense_gradient) at once; else the
    weight is the kept values themselves (nn.CompressedLinear) and the product's formula is the
    whole backward. The ops' own autograd makes a node per op, each a trip through
    torch.library's Python autograd layer: with the gather, about 0.4 ms of a 2.5 ms forward +
    backward of linear 4096->512 at 99% sparsity (BENCHMARKS.md); without, about 0.07 of 1.1 ms.
    With create_graph the backward op has no formula of its own, as on the ops' path: a second
    backward raises."""

    @staticmethod
    def forward(ctx, x, weight, bias, index: SparseIndex, gather: bool):
        # Gathered values are marked as requiring grad, as the kept values are: the product's
        # kernels then keep their input's transposed rows for the backward (forward_planes,
        # sparse_ops.cpp).
        values = call(OPS.sparse_gather, weight, index.row_ptr, index.col).requires_grad_() if gather else weight
        ctx.save_for_backward(x, values)
        ctx.index, ctx.gather = index, gather
        if gather:
            ctx.like = weight.detach()  # only its shape, dtype and layout are read
            ctx.key = weakref.ref(weight)
        return call(OPS.sparse_linear, x, values, bias, index.row_ptr, index.col, index.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, values = ctx.saved_tensors
        index = ctx.index
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gv = OPS.sparse_linear_backward(g, x, values, *index.csc, [need_x, need_w])
        gw = dense_gradient(gv, ctx.like, ctx.key(), index.row_ptr, index.col) if need_w and ctx.gather else gv
        return gx if need_x else None, gw if need_w else None, g.sum(0) if need_b else None, None, None


def conv2d(x, weight, bias, mask, stride, padding, dilation, groups, kept=None):
    """``F.conv2d(x, weight * mask, bias, ...)`` on the compressed path; arguments checked by
    ops.masked_conv2d (geometry as pairs); kept as in linear."""
    values, index = _values_index(weight, mask, kept)
    return sparse_conv2d(x, values, bias, index, *_conv_args(weight, stride, padding, dilation, groups))


def interval_linear(center, radius, weight, bias=None, mask=None, relu_in=False, out_bounds=False, kept=None):
    """ops.interval_linear on the compressed path (mask required: the kept weights are its
    ones); center, radius: (*, in_features); kept as in linear."""
    check_box(center, radius)
    check_layer(weight, bias, mask, 2, center, "center")
    if mask is None:
        raise ValueError("mask is required on the compressed path (it says which weights are kept)")
    if center.dim() < 1 or center.shape[-1] != weight.shape[1]:
        raise ValueError(f"center's last dimension must equal weight.size(1) (in_features = "
                         f"{weight.shape[1]}), got shape {tuple(center.shape)}")
    values, index = _values_index(weight, mask, kept)
    lead = center.shape[:-1]
    a, b = sparse_interval_linear(center.reshape(-1, center.shape[-1]), radius.reshape(-1, radius.shape[-1]),
                                  values, bias, index, relu_in, out_bounds)
    return a.view(*lead, -1), b.view(*lead, -1)


def interval_conv2d(center, radius, weight, bias=None, mask=None, stride=1, padding=0, dilation=1, groups=1,
                    relu_in=False, out_bounds=False, kept=None):
    """ops.interval_conv2d on the compressed path (mask required); center, radius: (N, C, H, W),
    any memory format; kept as in linear."""
    check_box(center, radius)
    check_layer(weight, bias, mask, 4, center, "center")
    if mask is None:
        raise ValueError("mask is required on the compressed path (it says which weights are kept)")
    stride, padding, dilation, groups = conv_input(center, "center", weight, stride, padding, dilation,
                                                   groups)
    values, index = _values_index(weight, mask, kept)
    return sparse_interval_conv2d(center, radius, values, bias, index,
                                  *_conv_args(weight, stride, padding, dilation, groups), relu_in, out_bounds)


# --- the ops on a SparseIndex: kernel, or twin where there is none -------------------------------------


def sparse_linear(x, values, bias, index: SparseIndex):
    if use_kernel("sparse_linear", x.device):
        return call(OPS.sparse_linear, x, values, bias, index.row_ptr, index.col, index.shape[0])
    return reference.sparse_linear(x, values, bias, index.row_ptr, index.col, index.shape[0])


def sparse_conv2d(x, values, bias, index: SparseIndex, kernel_size, stride, padding, dilation, groups):
    if use_kernel("sparse_conv2d", x.device):
        return call(OPS.sparse_conv2d, x, values, bias, index.row_ptr, index.col, kernel_size, stride, padding,
                    dilation, groups)
    return reference.sparse_conv2d(x, values, bias, index.row_ptr, index.col, kernel_size, stride, padding,
                                   dilation, groups)


def sparse_interval_linear(center, radius, values, bias, index: SparseIndex, relu_in, out_bounds):
    if use_kernel("sparse_interval_linear", center.device):
        return call(OPS.sparse_interval_linear, center, radius, values, bias, index.row_ptr, index.col,
                    index.shape[0], bool(relu_in), bool(out_bounds))
    if not bool((radius >= 0).all()):
        raise ValueError("radius must be >= 0 everywhere (no negative or NaN entries)")
    return reference.sparse_interval_linear(center, radius, values, bias, index.row_ptr, index.col,
                                            index.shape[0], relu_in, out_bounds)


def sparse_interval_conv2d(center, radius, values, bias, index: SparseIndex, kernel_size, stride, padding,
                           dilation, groups, relu_in, out_bounds):
    if use_kernel("sparse_interval_conv2d", center.device):
        return call(OPS.sparse_interval_conv2d, center, radius, values, bias, index.row_ptr, index.col,
                    kernel_size, stride, padding, dilation, groups, bool(relu_in), bool(out_bounds))
    if not bool((radius >= 0).all()):
        raise ValueError("radius must be >= 0 everywhere (no negative or NaN entries)")
    return reference.sparse_interval_conv2d(center, radius, values, bias, index.row_ptr, index.col, kernel_size,
                                            stride, padding, dilation, groups, relu_in, out_bounds)


# --- fake kernels and autograd ---------------------------------------------------------------------------
#
# The CSR ops' formulas need the CSC (and the CSC ops' the CSR): csc_of / csr_of find the one
# pack_mask made along with it, or compute it with shape-static ops (which also trace).


def _conv_output(x, out_channels, kernel_size, stride, padding, dilation):
    size = [(x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1
            for d in range(2)]
    return x.new_empty((x.shape[0], out_channels, *size)).contiguous(memory_format=suggest_memory_format(x))


def _register_linear():
    @torch.library.register_fake("robprune_fast::sparse_linear")
    def _fake(x, values, bias, row_ptr, col, out_features):
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("robprune_fast::sparse_linear_t")
    def _fake_t(g, values, col_ptr, row, csc_to_csr, in_features):
        return g.new_empty((g.shape[0], in_features))

    @torch.library.register_fake("robprune_fast::sparse_linear_values_grad")
    def _fake_values_grad(g, x, col_ptr, row, csc_to_csr):
        return g.new_empty(row.shape)

    @torch.library.register_fake("robprune_fast::sparse_linear_backward")
    def _fake_backward(grad, x, values, col_ptr, row, csc_to_csr, output_mask):
        return (torch.empty_like(x) if output_mask[0] else x.new_empty(0),
                torch.empty_like(values) if output_mask[1] else x.new_empty(0))

    def backward(ctx, g):
        x, values, row_ptr, col = ctx.saved_tensors
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        gx = gv = None
        if need_x or need_v:
            gx, gv = OPS.sparse_linear_backward(g, x, values, *csc_of(row_ptr, col, x.shape[1]), [need_x, need_v])
        return gx if need_x else None, gv if need_v else None, g.sum(0) if need_b else None, None, None, None

    # Saved: x, values, row_ptr, col.
    torch.library.register_autograd("robprune_fast::sparse_linear", backward, setup_context=saving(0, 1, 3, 4))

    # y = g W2: dg = dy W2^T (the forward product), dW2 = g^T dy at the kept weights.
    def backward_t(ctx, dy):
        g, values, col_ptr, row, csc_to_csr = ctx.saved_tensors
        row_ptr, col = csr_of(col_ptr, row, csc_to_csr, g.shape[1])
        dg = OPS.sparse_linear(dy, values, None, row_ptr, col, g.shape[1]) if ctx.needs_input_grad[0] else None
        dv = OPS.sparse_linear_values_grad(g, dy, col_ptr, row, csc_to_csr) if ctx.needs_input_grad[1] else None
        return dg, dv, None, None, None, None

    # Saved: g, values, col_ptr, row, csc_to_csr.
    torch.library.register_autograd("robprune_fast::sparse_linear_t", backward_t,
                                    setup_context=saving(0, 1, 2, 3, 4))


def _register_conv2d():
    @torch.library.register_fake("robprune_fast::sparse_conv2d")
    def _fake(x, values, bias, row_ptr, col, kernel_size, stride, padding, dilation, groups):
        return _conv_output(x, row_ptr.shape[0] - 1, kernel_size, stride, padding, dilation)

    @torch.library.register_fake("robprune_fast::sparse_conv2d_t")
    def _fake_t(g, values, col_ptr, row, csc_to_csr, input_size, kernel_size, stride, padding, dilation, groups):
        channels = (col_ptr.shape[0] - 1) // (kernel_size[0] * kernel_size[1]) * groups
        out = g.new_empty((g.shape[0], channels, *input_size))
        return out.contiguous(memory_format=suggest_memory_format(g))

    @torch.library.register_fake("robprune_fast::sparse_conv2d_values_grad")
    def _fake_values_grad(g, x, row_ptr, col, kernel_size, stride, padding, dilation, groups):
        return g.new_empty(col.shape)

    def backward(ctx, g):
        x, values, row_ptr, col = ctx.saved_tensors
        kernel_size, stride, padding, dilation, groups = ctx.geometry
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        cols = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
        gx = OPS.sparse_conv2d_t(g, values, *csc_of(row_ptr, col, cols), list(x.shape[2:]),
                                 *ctx.geometry) if need_x else None
        gv = OPS.sparse_conv2d_values_grad(g, x, row_ptr, col, *ctx.geometry) if need_v else None
        return (gx, gv, g.sum((0, 2, 3)) if need_b else None) + (None,) * 7

    # Saved: x, values, row_ptr, col; then the geometry (kernel size to groups).
    torch.library.register_autograd("robprune_fast::sparse_conv2d", backward,
                                    setup_context=saving(0, 1, 3, 4, geometry_from=5))

    # y = conv^T g: dg = conv(dy), and the values' gradient of <g, conv(dy)>.
    def backward_t(ctx, dy):
        g, values, col_ptr, row, csc_to_csr = ctx.saved_tensors
        row_ptr, col = csr_of(col_ptr, row, csc_to_csr, g.shape[1])
        dg = OPS.sparse_conv2d(dy, values, None, row_ptr, col, *ctx.geometry) if ctx.needs_input_grad[0] else None
        dv = OPS.sparse_conv2d_values_grad(g, dy, row_ptr, col, *ctx.geometry) if ctx.needs_input_grad[1] else None
        return (dg, dv) + (None,) * 9

    # Saved: g, values, col_ptr, row, csc_to_csr; then the geometry after input_size.
    torch.library.register_autograd("robprune_fast::sparse_conv2d_t", backward_t,
                                    setup_context=saving(0, 1, 2, 3, 4, geometry_from=6))


def _register_interval(name: str, n_geometry: int, layer_output, columns, backward_geometry) -> None:
    """Fake kernel and autograd of sparse_interval_<name>(center, radius, values, bias, row_ptr,
    col, *geometry, relu_in, out_bounds[, check_radius]); geometry: (out_features,) for linear,
    (kernel_size, stride, padding, dilation, groups) for conv2d. layer_output(center, out,
    geometry): the output, empty; columns(center, geometry): W2's columns; backward_geometry:
    the geometry the backward op takes."""
    op = f"robprune_fast::sparse_interval_{name}"
    backward_op = getattr(OPS, f"sparse_interval_{name}_backward")

    @torch.library.register_fake(op)
    def _fake(center, radius, values, bias, row_ptr, col, *rest):
        out = layer_output(center, row_ptr.shape[0] - 1, rest[:n_geometry])
        return out, torch.empty_like(out)

    @torch.library.register_fake(f"{op}_backward")
    def _fake_backward(grad_a, grad_b, center, radius, values, *rest):
        output_mask = rest[-1]
        like = (center, radius, values, grad_a.new_empty(grad_a.shape[1]))
        return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, output_mask))

    def setup(ctx, inputs, output):
        center, radius, values, bias, row_ptr, col, *rest = inputs
        ctx.save_for_backward(center, radius, values, row_ptr, col)
        ctx.geometry = rest[:n_geometry]
        ctx.relu_in, ctx.out_bounds = rest[n_geometry:n_geometry + 2]
        ctx.n_rest = len(rest)  # the geometry and the flags get no gradient

    def backward(ctx, grad_a, grad_b):
        center, radius, values, row_ptr, col = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:4])
        csc = csc_of(row_ptr, col, columns(center, ctx.geometry))
        grads = backward_op(grad_a, grad_b, center, radius, values, row_ptr, col, *csc,
                            *backward_geometry(ctx.geometry), ctx.relu_in, ctx.out_bounds, need)
        return tuple(g if wanted else None for g, wanted in zip(grads, need)) + (None,) * (2 + ctx.n_rest)

    torch.library.register_autograd(op, backward, setup_context=setup)


def _interval_linear_output(center, out_features, geometry):
    return center.new_empty((center.shape[0], out_features))


def _interval_conv2d_output(center, out_channels, geometry):
    kernel_size, stride, padding, dilation, groups = geometry
    return _conv_output(center, out_channels, kernel_size, stride, padding, dilation)


if _C is not None:
    _register_linear()
    _register_conv2d()
    _register_interval("linear", 1, _interval_linear_output, lambda center, geometry: center.shape[1],
                       lambda geometry: [])
    _register_interval("conv2d", 5, _interval_conv2d_output,
                       lambda center, g: center.shape[1] // g[4] * g[0][0] * g[0][1], lambda geometry: geometry)
