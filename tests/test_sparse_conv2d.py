"""The compressed convolution ops (sparse_conv2d, its transpose sparse_conv2d_t, and
sparse_conv2d_values_grad) called through torch.ops against their twins: values and gradients
over geometries (stride, padding, dilation, groups, rectangular kernels), layouts (channels_last,
non-contiguous, batch 1), empty and full masks; opcheck; float64 gradcheck; on every device (CUDA
where there is one)."""
import pytest
import torch

from robprune_fast import reference
from robprune_fast.ops import sparse  # noqa: F401  (registers the fake kernels and autograd)
from tests.helpers.masked import SPARSITIES, compare_op, compressed, random_mask
from tests.helpers.ops import DEVICES

OPS = torch.ops.robprune_fast

# (kernel_size, stride, padding, dilation, groups)
GEOMETRIES = [((3, 3), [1, 1], [1, 1], [1, 1], 1),
              ((3, 3), [2, 2], [1, 1], [1, 1], 1),
              ((3, 2), [2, 1], [0, 2], [1, 2], 1),
              ((3, 3), [1, 1], [2, 2], [2, 2], 2),
              ((4, 4), [2, 2], [1, 1], [1, 1], 1),
              ((1, 1), [1, 1], [0, 0], [1, 1], 1),
              ((5, 5), [3, 2], [2, 0], [1, 1], 1)]


def problem(n, c_in, c_out, size, geometry, sparsity, dtype, device="cpu", seed=0):
    """The same numbers on every device (drawn on the CPU), packed on the device."""
    kernel_size, *_, groups = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *size, generator=g, dtype=dtype).to(device)
    w = torch.randn(c_out, c_in // groups, *kernel_size, generator=g, dtype=dtype).to(device)
    b = torch.randn(c_out, generator=g, dtype=dtype).to(device)
    index, values = compressed(w, random_mask(w.shape, sparsity, dtype, "cpu", g).to(device))
    return x, values, b, index


def output_like(x, values, b, index, geometry):
    return reference.sparse_conv2d(x, values, b, index.row_ptr, index.col, *geometry)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("op", ["conv", "transpose"])
def test_matches_twin(op, geometry, sparsity, device):
    """The convolution, and its transpose back to the input's size (the input gradient)."""
    dtype = torch.float32
    x, v, b, index = problem(3, 4, 6, (9, 8), geometry, sparsity, dtype, device)
    if op == "conv":
        compare_op(OPS.sparse_conv2d, reference.sparse_conv2d, (x, v, b, index.row_ptr, index.col, *geometry),
                   dtype)
    else:
        g = torch.randn_like(output_like(x, v, b, index, geometry))
        compare_op(OPS.sparse_conv2d_t, reference.sparse_conv2d_t, (g, v, *index.csc, [9, 8], *geometry), dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_values_grad_matches_twin(geometry, device):
    dtype = torch.float64
    x, v, b, index = problem(3, 4, 6, (9, 8), geometry, 0.5, dtype, device)
    g = torch.randn_like(output_like(x, v, b, index, geometry))
    compare_op(OPS.sparse_conv2d_values_grad, reference.sparse_conv2d_values_grad,
               (g, x, index.row_ptr, index.col, *geometry), dtype, grads=False)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 8), (5, 6), (4, 4), (1, 1), (17, 40)], ids=str)
def test_plane_sizes(size, dtype, device):
    """Planes narrower and wider than a vector (one vector a row, half a vector: the kernels then
    take narrower vectors), and a single pixel, in both dtypes."""
    geometry = ((3, 3), [1, 1], [1, 1], [1, 1], 1)
    x, v, b, index = problem(2, 5, 7, size, geometry, 0.6, dtype, device)
    compare_op(OPS.sparse_conv2d, reference.sparse_conv2d, (x, v, b, index.row_ptr, index.col, *geometry), dtype)
    g = torch.randn_like(output_like(x, v, b, index, geometry))
    compare_op(OPS.sparse_conv2d_t, reference.sparse_conv2d_t, (g, v, *index.csc, list(size), *geometry), dtype)
    compare_op(OPS.sparse_conv2d_values_grad, reference.sparse_conv2d_values_grad,
               (g, x, index.row_ptr, index.col, *geometry), dtype, grads=False)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "batch1"])
def test_layouts(layout, device):
    dtype = torch.float64
    geometry = ((3, 3), [2, 1], [1, 1], [1, 1], 1)
    x, v, b, index = problem(1 if layout == "batch1" else 2, 3, 5, (7, 6), geometry, 0.5, dtype, device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    y = compare_op(OPS.sparse_conv2d, reference.sparse_conv2d, (x, v, b, index.row_ptr, index.col, *geometry), dtype)[0]
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    gx = compare_op(OPS.sparse_conv2d_t, reference.sparse_conv2d_t, (g, v, *index.csc, [7, 6], *geometry), dtype)[0]
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)
    compare_op(OPS.sparse_conv2d_values_grad, reference.sparse_conv2d_values_grad,
               (g, x, index.row_ptr, index.col, *geometry), dtype, grads=False)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_non_finite_input_stays_where_it_belongs(device):
    """An inf pixel that no kept weight of a tap reaches (the kernels read padded rows past the
    output's columns) must not turn that weight's gradient into NaN."""
    geometry = ((3, 3), [1, 1], [0, 0], [1, 1], 1)
    x, v, b, index = problem(1, 1, 1, (6, 6), geometry, 0.0, torch.float64, device)
    x[0, 0, 0, 5] = float("inf")  # read by tap (0, 2) only
    g = torch.ones(1, 1, 4, 4, dtype=torch.float64, device=device)
    got = OPS.sparse_conv2d_values_grad(g, x, index.row_ptr, index.col, *geometry)
    want = reference.sparse_conv2d_values_grad(g, x, index.row_ptr, index.col, *geometry)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_padding_is_zero_over_a_used_buffer(geometry):
    """The packs' planes are zero in their padding although they are scratch buffers that the
    calls before filled: a call that fills them with NaN first must not leak into the next
    call's padding."""
    dtype = torch.float32
    x, v, b, index = problem(3, 4, 6, (9, 8), geometry, 0.5, dtype)
    dirty = torch.full((3, 4, 40, 40), float("nan"))
    unpadded = ((1, 1), [1, 1], [0, 0], [1, 1], 1)
    d_index, d_values = compressed(torch.ones(6, 4, 1, 1), torch.ones(6, 4, 1, 1))
    OPS.sparse_conv2d(dirty, d_values, None, d_index.row_ptr, d_index.col, *unpadded)
    OPS.sparse_conv2d_values_grad(torch.full((3, 6, 40, 40), float("nan")), dirty, d_index.row_ptr,
                                  d_index.col, *unpadded)
    torch.testing.assert_close(OPS.sparse_conv2d(x, v, b, index.row_ptr, index.col, *geometry),
                               reference.sparse_conv2d(x, v, b, index.row_ptr, index.col, *geometry))
    g = torch.randn_like(output_like(x, v, b, index, geometry))
    OPS.sparse_conv2d_values_grad(torch.full((3, 6, 40, 40), float("nan")), dirty, d_index.row_ptr,
                                  d_index.col, *unpadded)
    torch.testing.assert_close(OPS.sparse_conv2d_t(g, v, *index.csc, [9, 8], *geometry),
                               reference.sparse_conv2d_t(g, v, *index.csc, [9, 8], *geometry))
    OPS.sparse_conv2d_values_grad(torch.full((3, 6, 40, 40), float("nan")), dirty, d_index.row_ptr,
                                  d_index.col, *unpadded)
    torch.testing.assert_close(OPS.sparse_conv2d_values_grad(g, x, index.row_ptr, index.col, *geometry),
                               reference.sparse_conv2d_values_grad(g, x, index.row_ptr, index.col, *geometry))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    geometry = ((3, 3), [2, 1], [1, 1], [1, 1], 2)
    x, v, b, index = problem(2, 4, 6, (6, 5), geometry, 0.5, torch.float32, device)
    leaves = [t.requires_grad_(True) for t in (x, v, b)]
    torch.library.opcheck(OPS.sparse_conv2d, (*leaves, index.row_ptr, index.col, *geometry))
    g = torch.randn_like(output_like(x, v, b, index, geometry)).requires_grad_(True)
    torch.library.opcheck(OPS.sparse_conv2d_t, (g, v, *index.csc, [6, 5], *geometry))
    torch.library.opcheck(OPS.sparse_conv2d_values_grad, (g.detach(), x.detach(), index.row_ptr, index.col, *geometry))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(OPS.sparse_conv2d, (cl, v, b, index.row_ptr, index.col, *geometry))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_gradcheck_float64(device):
    geometry = ((3, 3), [2, 1], [1, 1], [1, 1], 1)
    x, v, b, index = problem(2, 2, 3, (5, 4), geometry, 0.5, torch.float64, device)
    assert torch.autograd.gradcheck(
        lambda x, v, b: OPS.sparse_conv2d(x, v, b, index.row_ptr, index.col, *geometry),
        [t.requires_grad_(True) for t in (x, v, b)])
    g = torch.randn_like(output_like(x, v, b, index, geometry)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g, v: OPS.sparse_conv2d_t(g, v, *index.csc, [5, 4], *geometry), [g, v])
