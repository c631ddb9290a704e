"""The compressed interval ops (sparse_interval_linear / _conv2d): against the dense fused
interval ops with the mask (ops.interval_linear / interval_conv2d), values and the gradients of
centre, radius, weight and bias, for every relu_in / out_bounds; against their twins through
torch.ops; sound by sampling; the radius check; opcheck; float64 gradcheck; on every device (CUDA
where there is one)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from robprune_fast import ops, reference
from robprune_fast.ops import sparse
from tests.helpers.masked import SPARSITIES, TOL, compare_op, compressed, exact_twins, random_mask  # noqa: F401
from tests.helpers.ops import DEVICES

OPS = torch.ops.robprune_fast
FLAGS = list(itertools.product([False, True], [False, True]))  # (relu_in, out_bounds)
CONV = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
pytestmark = pytest.mark.usefixtures("exact_twins")  # the dense ops and layers the tests compare with


def box(shape, dtype, g):
    center = torch.randn(shape, generator=g, dtype=dtype)
    radius = torch.rand(shape, generator=g, dtype=dtype) * (torch.rand(shape, generator=g, dtype=dtype) > 0.1)
    return center, radius


def layer(kind, sparsity, dtype, seed=0, n=5, device="cpu"):
    """The same numbers on every device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        c, r = box((n, 37), dtype, g)
        w = torch.randn(21, 37, generator=g, dtype=dtype)
    else:
        c, r = box((n, 4, 9, 8), dtype, g)
        w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(w.shape[0], generator=g, dtype=dtype)
    return tuple(t.to(device) for t in (c, r, w, b, random_mask(w.shape, sparsity, dtype, "cpu", g)))


def run(lib, kind, c, r, w, b, m, relu_in, out_bounds):
    if kind == "linear":
        return lib.interval_linear(c, r, w, b, m, relu_in=relu_in, out_bounds=out_bounds)
    return lib.interval_conv2d(c, r, w, b, m, **CONV, relu_in=relu_in, out_bounds=out_bounds)


def assert_agree(compressed, dense, leaves, dtype):
    """compressed(c, r, w, b) and dense(c, r, w, b) on fresh copies of leaves: equal outputs, and
    equal gradients of each leaf for one random cotangent; returns the compressed call's leaves."""
    fresh = lambda: [t.clone().requires_grad_(True) for t in leaves]
    a_in, b_in = fresh(), fresh()
    got, want = compressed(*a_in), dense(*b_in)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[dtype])
    cots = [torch.randn_like(y) for y in want]
    torch.autograd.backward(list(got), cots)
    torch.autograd.backward(list(want), cots)
    for name, x, y in zip(("center", "radius", "weight", "bias"), a_in, b_in):
        torch.testing.assert_close(x.grad, y.grad, **TOL[dtype], msg=f"grad of {name}")
    return a_in


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_dense_interval_op(kind, sparsity, flags, dtype, device):
    c, r, w, b, m = layer(kind, sparsity, dtype, device=device)
    a_in = assert_agree(lambda *t: run(sparse, kind, *t, m, *flags), lambda *t: run(ops, kind, *t, m, *flags),
                        (c, r, w, b), dtype)
    assert bool((a_in[2].grad[m == 0] == 0).all()), "a pruned weight received a gradient"


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=str)
def test_ops_match_twins(flags, device):
    dtype = torch.float64
    c, r, w, b, m = layer("linear", 0.5, dtype, device=device)
    index, v = compressed(w, m)
    compare_op(lambda *a: OPS.sparse_interval_linear(*a, *flags),
               lambda *a: reference.sparse_interval_linear(*a, *flags), (c, r, v, b, index.row_ptr, index.col, 21),
               dtype)
    c, r, w, b, m = layer("conv2d", 0.5, dtype, device=device)
    index, v = compressed(w, m)
    geometry = ([3, 3], [2, 1], [1, 1], [1, 1], 2)
    compare_op(lambda *a: OPS.sparse_interval_conv2d(*a, *flags),
               lambda *a: reference.sparse_interval_conv2d(*a, *flags),
               (c, r, v, b, index.row_ptr, index.col, *geometry), dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "batch1"])
def test_conv_layouts(layout, device):
    c, r, w, b, m = layer("conv2d", 0.7, torch.float64, n=1 if layout == "batch1" else 3, device=device)
    if layout == "channels_last":
        c, r = (t.contiguous(memory_format=torch.channels_last) for t in (c, r))
    got = run(sparse, "conv2d", c, r, w, b, m, True, True)
    want = run(ops, "conv2d", c, r, w, b, m, True, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
        assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_sound_by_sampling(kind, device):
    """Points of the box (interior and corners) through the real masked layer land inside."""
    c, r, w, b, m = layer(kind, 0.8, torch.float32, n=3, device=device)
    lower, upper = run(sparse, kind, c, r, w, b, m, True, True)
    slack = 1e-5 * (1 + torch.maximum(lower.abs(), upper.abs()).amax())
    for i in range(64):
        u = torch.rand_like(c) * 2 - 1
        x = torch.relu(c + r * (u.sign() if i % 2 else u))
        y = F.linear(x, w * m, b) if kind == "linear" else F.conv2d(x, w * m, b, **CONV)
        assert bool((y >= lower - slack).all()) and bool((y <= upper + slack).all()), f"sample {i} outside"


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_radius_check(device):
    c, r, w, b, m = layer("linear", 0.5, torch.float32, device=device)
    index, v = compressed(w, m)
    bad = r.clone()
    bad[0, 0] = -1
    with pytest.raises(RuntimeError, match="radius must be >= 0"):
        OPS.sparse_interval_linear(c, bad, v, b, index.row_ptr, index.col, 21, False, False)
    OPS.sparse_interval_linear(c, bad, v, b, index.row_ptr, index.col, 21, False, False, check_radius=False)
    c, r, w, b, m = layer("conv2d", 0.5, torch.float32, device=device)
    index, v = compressed(w, m)
    bad = r.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="radius must be >= 0"):
        OPS.sparse_interval_conv2d(c, bad, v, b, index.row_ptr, index.col, [3, 3], [2, 1], [1, 1], [1, 1], 2,
                                   True, False)


def test_mask_is_required():
    c, r, w, b, _ = layer("linear", 0.5, torch.float32)
    with pytest.raises(ValueError, match="mask is required"):
        sparse.interval_linear(c, r, w, b, None)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    c, r, w, b, m = layer("linear", 0.5, torch.float32, device=device)
    index, v = compressed(w, m)
    leaves = [t.requires_grad_(True) for t in (c, r, b)]
    for flags in FLAGS:
        torch.library.opcheck(OPS.sparse_interval_linear, (*leaves[:2], v, leaves[2], index.row_ptr, index.col, 21,
                                                           *flags))
    c, r, w, b, m = layer("conv2d", 0.5, torch.float32, device=device)
    index, v = compressed(w, m)
    leaves = [t.requires_grad_(True) for t in (c, r, b)]
    geometry = ([3, 3], [2, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(OPS.sparse_interval_conv2d, (*leaves[:2], v, leaves[2], index.row_ptr, index.col, *geometry,
                                                       True, True), {"check_radius": False})


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(1)
    c, r = (t.to(device) for t in box((2, 6), torch.float64, g))
    r = r + 0.1  # away from the kinks of the ReLU box
    w = torch.randn(4, 6, dtype=torch.float64, generator=g).to(device)
    index, v = compressed(w, random_mask(w.shape, 0.5, torch.float64, "cpu", g).to(device))
    b = torch.randn(4, dtype=torch.float64, generator=g).to(device)
    for flags in FLAGS:
        assert torch.autograd.gradcheck(
            lambda c, r, v, b: OPS.sparse_interval_linear(c, r, v, b, index.row_ptr, index.col, 4, *flags),
            [t.clone().requires_grad_(True) for t in (c, r, v, b)])
    c, r = (t.to(device) for t in box((2, 2, 5, 4), torch.float64, g))
    r = r + 0.1
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g).to(device)
    index, v = compressed(w, random_mask(w.shape, 0.5, torch.float64, "cpu", g).to(device))
    b = torch.randn(3, dtype=torch.float64, generator=g).to(device)
    geometry = ([3, 3], [2, 1], [1, 1], [1, 1], 1)
    assert torch.autograd.gradcheck(
        lambda c, r, v, b: OPS.sparse_interval_conv2d(c, r, v, b, index.row_ptr, index.col, *geometry, True, True),
        [t.clone().requires_grad_(True) for t in (c, r, v, b)])


@pytest.mark.parametrize("geometry", [(4, 2, 16), (3, 1, 16), (3, 1, 8)], ids=["4x4s2_to_8x8", "3x3_16x16", "3x3_8x8"])
def test_planes_of_one_and_half_a_vector(geometry):
    """cnn_large's shapes: output rows of 16 and 8 floats, one AVX-512 vector and half of one
    (the kernels then take vectors half as wide), values and gradients in float32."""
    k, stride, size = geometry
    g = torch.Generator().manual_seed(1)
    c, r = box((3, 5, size, size), torch.float32, g)
    w = torch.randn(7, 5, k, k, generator=g)
    b = torch.randn(7, generator=g)
    m = random_mask(w.shape, 0.9, torch.float32, "cpu", g)
    assert_agree(lambda *t: sparse.interval_conv2d(*t, m, stride=stride, padding=1, relu_in=True),
                 lambda *t: ops.interval_conv2d(*t, m, stride=stride, padding=1, relu_in=True), (c, r, w, b),
                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu_in", [False, True])
@pytest.mark.parametrize("geometry", [(3, 0, (9, 9)), (4, 1, (9, 8)), (3, 1, (16, 16)), (4, 2, (17, 40)),
                                      (3, 1, (5, 6)), (2, 0, (2, 3))], ids=str)
def test_planes_of_stride_two(geometry, relu_in, dtype):
    """Stride 2 in both directions: the input gradient comes from the phases' regions,
    interleaved (and through the ReLU's gradient with relu_in) in one pass, whose rows of even
    and odd width, wider than a vector or not, and paddings of every parity are what this
    checks, values and gradients against the dense op."""
    k, padding, size = geometry
    g = torch.Generator().manual_seed(2)
    c, r = box((3, 4, *size), dtype, g)
    w = torch.randn(5, 4, k, k, generator=g, dtype=dtype)
    b = torch.randn(5, generator=g, dtype=dtype)
    m = random_mask(w.shape, 0.5, dtype, "cpu", g)
    assert_agree(lambda *t: sparse.interval_conv2d(*t, m, stride=2, padding=padding, relu_in=relu_in),
                 lambda *t: ops.interval_conv2d(*t, m, stride=2, padding=padding, relu_in=relu_in), (c, r, w, b),
                 dtype)


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_fused_first_layer_gradients(flags, stride):
    """A first layer's backward: the box needs no gradient, only the weight and the bias do (the
    op then reads the output's gradients as they are, without gradient planes, unless
    out_bounds converts them)."""
    g = torch.Generator().manual_seed(3)
    c, r = box((4, 3, 9, 10), torch.float64, g)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    m = random_mask(w.shape, 0.5, torch.float64, "cpu", g)
    grads = []
    for lib in (sparse, ops):
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = lib.interval_conv2d(c, r, wl, bl, m, stride=stride, padding=1, relu_in=flags[0], out_bounds=flags[1])
        torch.autograd.backward(list(out), [torch.ones_like(out[0]), torch.linspace(-1, 1, out[1].numel(),
                                                                                  dtype=torch.float64).view_as(out[1])])
        grads.append((wl.grad, bl.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 17, 130])
@pytest.mark.parametrize("need", ["all", "values_only", "box_only"])
def test_linear_backward_over_batch_chunks(n, need, dtype):
    """The linear backward's transposed product carries the values' gradient along (one pass
    over the output gradient's rows for both): batches of one vector's part, of a whole vector
    and a tail, and of several chunks (whose dot products add up), and each gradient asked for
    alone, against the dense op, with the ReLU's gradient in front."""
    g = torch.Generator().manual_seed(4)
    c, r = box((n, 70), dtype, g)
    w = torch.randn(33, 70, generator=g, dtype=dtype)
    b = torch.randn(33, generator=g, dtype=dtype)
    m = random_mask(w.shape, 0.8, dtype, "cpu", g)
    grads = []
    for lib in (sparse, ops):
        box_grad, values_grad = need in ("all", "box_only"), need in ("all", "values_only")
        cl, rl = c.clone().requires_grad_(box_grad), r.clone().requires_grad_(box_grad)
        wl, bl = w.clone().requires_grad_(values_grad), b.clone().requires_grad_(values_grad)
        out = lib.interval_linear(cl, rl, wl, bl, m, relu_in=True)
        cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(k), dtype=dtype) for k, o in enumerate(out)]
        torch.autograd.backward(list(out), cots)
        grads.append([t.grad for t in (cl, rl, wl, bl) if t.requires_grad])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **TOL[dtype])
    assert len(grads[0]) == (4 if need == "all" else 2)


@pytest.mark.parametrize("box_grad", [False, True])
@pytest.mark.parametrize("geometry", [(3, 1, 1, (7, 9)), (4, 2, 1, (16, 16))], ids=str)
def test_conv_bias_gradient_over_image_blocks(geometry, box_grad):
    """The weights' gradient pass also sums the bias's, a block of images at a time: more images
    than a block, rows with and without a partial vector, from gradient planes (box_grad) and
    from the output's gradient as it is (a first layer), against the dense op."""
    k, stride, padding, size = geometry
    g = torch.Generator().manual_seed(5)
    c, r = box((19, 3, *size), torch.float32, g)
    w = torch.randn(5, 3, k, k, generator=g)
    b = torch.randn(5, generator=g)
    m = random_mask(w.shape, 0.6, torch.float32, "cpu", g)
    grads = []
    for lib in (sparse, ops):
        cl, rl = c.clone().requires_grad_(box_grad), r.clone().requires_grad_(box_grad)
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = lib.interval_conv2d(cl, rl, wl, bl, m, stride=stride, padding=padding, relu_in=box_grad)
        cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(j)) for j, o in enumerate(out)]
        torch.autograd.backward(list(out), cots)
        grads.append((wl.grad, bl.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
