"""The input planes a compressed layer's forward retains for its backward
(csrc/sparse/sparse_planes.h, RetainedPlanes): a forward whose values require grad keeps its
packed input (a convolution's planes, a linear layer's transposed rows), and the backward op
reuses it only for the very same input, unchanged, packed by the same op. Every case calls the
backward op
directly with an input that differs from the forward's in one way a stale entry would miss,
and compares with the twin."""
import pytest
import torch

from robprune_fast import reference
from robprune_fast.ops import sparse  # noqa: F401  (registers the fake kernels and autograd)
from tests.helpers.masked import TOL, compressed, random_mask

OPS = torch.ops.robprune_fast
CONV = ([3, 3], [2, 2], [1, 1], [1, 1], 1)


def conv_input(seed):
    return torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(seed))


def plain_problem(seed=0):
    """A convolution (4 -> 6 channels, CONV's geometry) and the gradient of its output."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, generator=g)
    index, values = compressed(w, random_mask(w.shape, 0.6, torch.float32, "cpu", g))
    return conv_input(seed), values, index, torch.randn(3, 6, 5, 5, generator=g)


def forward(x, values, index):
    """The forward with values requiring grad: it retains x's planes."""
    return OPS.sparse_conv2d(x, values.detach().requires_grad_(True), None, index.row_ptr, index.col, *CONV)


def check_weight_grad(x, values, index, grad):
    got = OPS.sparse_conv2d_values_grad(grad, x, index.row_ptr, index.col, *CONV)
    leaf = values.detach().requires_grad_(True)
    reference.sparse_conv2d(x, leaf, None, index.row_ptr, index.col, *CONV).backward(grad)
    torch.testing.assert_close(got, leaf.grad, **TOL[torch.float32])


def test_same_input_reuses_the_planes_exactly():
    x, values, index, grad = plain_problem()
    forward(x, values, index)
    check_weight_grad(x, values, index, grad)


def test_input_changed_in_place_is_packed_again():
    x, values, index, grad = plain_problem()
    forward(x, values, index)
    with torch.no_grad():
        x.mul_(-3.0).add_(1.0)  # same tensor, same memory, a new version
    check_weight_grad(x, values, index, grad)


def in_storage(storage, values):
    """A new tensor over storage holding values: a fresh version counter, made the same way
    each time (so the same version)."""
    t = torch.empty(0).set_(storage, 0, values.shape)
    return t.copy_(values)


def test_a_new_input_at_a_freed_input_s_address_and_version_is_packed_again():
    """What an entry holds is the input itself (weakly), not only its address and version: a new
    tensor where a freed input lay, at the same version, is not the input."""
    _, values, index, grad = plain_problem()
    storage = torch.empty(conv_input(0).numel()).untyped_storage()
    x = in_storage(storage, conv_input(0))
    forward(x, values, index)
    key = (x.data_ptr(), x._version)
    del x
    x = in_storage(storage, conv_input(1))
    assert (x.data_ptr(), x._version) == key
    check_weight_grad(x, values, index, grad)


def test_a_forward_repeated_after_a_data_change_replaces_the_entry():
    """An input changed through .data (no version bump, as an attack's step or gradcheck's
    perturbation does) and run forward again: the backward reads the planes of the last
    forward, the input as it is now (what autograd's saved input holds), not the first's."""
    _, values, index, grad = plain_problem()
    for seed in range(4):
        x = conv_input(seed)
        forward(x, values, index)
        x.data.mul_(-2.0).add_(0.5)
        forward(x, values, index)
        check_weight_grad(x, values, index, grad)


def test_more_forwards_than_entries_before_the_backwards():
    """Entries are recycled least recently used first: the early forwards' planes are gone by
    their backward, which packs again."""
    _, values, index, grad = plain_problem()
    inputs = [conv_input(s) for s in range(20)]
    for x in inputs:
        forward(x, values, index)
    for x in reversed(inputs):
        check_weight_grad(x, values, index, grad)


@pytest.mark.parametrize("relu_in", [False, True])
def test_interval_conv_backward_after_input_change(relu_in):
    g = torch.Generator().manual_seed(3)
    center, radius = torch.randn(2, 4, 9, 9, generator=g), torch.rand(2, 4, 9, 9, generator=g)
    w = torch.randn(6, 4, 3, 3, generator=g)
    index, values = compressed(w, random_mask(w.shape, 0.6, torch.float32, "cpu", g))
    args = (index.row_ptr, index.col, *CONV, relu_in, False)
    a, _ = OPS.sparse_interval_conv2d(center, radius, values.detach().requires_grad_(True), None, *args)
    ga, gb = torch.randn(a.shape, generator=g), torch.rand(a.shape, generator=g)
    for change in (None, "center", "radius"):
        if change:
            with torch.no_grad():
                (center if change == "center" else radius).mul_(0.5)
        got = OPS.sparse_interval_conv2d_backward(ga, gb, center, radius, values, *args[:2], *index.csc, *CONV,
                                                  relu_in, False, [False, False, True, False])[2]
        leaf = values.detach().requires_grad_(True)
        want_a, want_b = reference.sparse_interval_conv2d(center, radius, leaf, None, *args)
        torch.autograd.backward([want_a, want_b], [ga, gb])
        torch.testing.assert_close(got, leaf.grad, **TOL[torch.float32], msg=f"after changing {change}")


def conv_problem(seed=4):
    g = torch.Generator().manual_seed(seed)
    center, radius = torch.randn(2, 4, 9, 9, generator=g), torch.rand(2, 4, 9, 9, generator=g)
    w = torch.randn(6, 4, 3, 3, generator=g)
    index, values = compressed(w, random_mask(w.shape, 0.6, torch.float32, "cpu", g))
    return center, radius, index, values


def test_planes_of_another_op_are_not_taken():
    """A forward's ReLU box planes never serve a backward without the ReLU."""
    center, radius, index, values = conv_problem()
    a, _ = OPS.sparse_interval_conv2d(center, radius, values.detach().requires_grad_(True), None, index.row_ptr,
                                      index.col, *CONV, True, False)
    ga, gb = torch.randn(a.shape), torch.rand(a.shape)
    got = OPS.sparse_interval_conv2d_backward(ga, gb, center, radius, values, index.row_ptr, index.col, *index.csc,
                                              *CONV, False, False, [False, False, True, False])[2]
    leaf = values.detach().requires_grad_(True)
    torch.autograd.backward(list(reference.sparse_interval_conv2d(center, radius, leaf, None, index.row_ptr, index.col,
                                                                  *CONV, False, False)), [ga, gb])
    torch.testing.assert_close(got, leaf.grad, **TOL[torch.float32])


def test_unchecked_planes_never_skip_a_radius_check():
    """Planes packed without the radius check (check_radius=False) do not serve a call that
    checks: a negative radius is still refused."""
    center, radius, index, values = conv_problem()
    radius[0, 1, 2, 3] = -1.0
    args = (None, index.row_ptr, index.col, *CONV, False, False)
    OPS.sparse_interval_conv2d(center, radius, values.detach().requires_grad_(True), *args, False)
    with pytest.raises(RuntimeError, match="radius"):
        OPS.sparse_interval_conv2d(center, radius, values.detach().requires_grad_(True), *args, True)


# --- linear layers: the input's transposed rows ------------------------------------------------------


def linear_problem(seed=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 12, generator=g)
    index, values = compressed(w, random_mask(w.shape, 0.6, torch.float32, "cpu", g))
    return torch.randn(7, 12, generator=g), values, index, torch.randn(7, 5, generator=g)


def linear_forward(x, values, index):
    return OPS.sparse_linear(x, values.detach().requires_grad_(True), None, index.row_ptr, index.col, 5)


@pytest.mark.parametrize("change", [None, "in place", ".data, then a second forward", "a new input"])
def test_linear_backward_reads_the_input_as_it_is(change):
    x, values, index, grad = linear_problem()
    linear_forward(x, values, index)
    if change == "in place":
        with torch.no_grad():
            x.mul_(-3.0).add_(1.0)
    elif change == ".data, then a second forward":
        x.data.mul_(-2.0).add_(0.5)
        linear_forward(x, values, index)
    elif change == "a new input":
        x = linear_problem(6)[0]
    gx, gv = OPS.sparse_linear_backward(grad, x, values, *index.csc, [True, True])
    leaf_x, leaf_v = x.detach().requires_grad_(True), values.detach().requires_grad_(True)
    reference.sparse_linear(leaf_x, leaf_v, None, index.row_ptr, index.col, 5).backward(grad)
    torch.testing.assert_close(gv, leaf_v.grad, **TOL[torch.float32], msg=f"values' gradient after {change}")
    torch.testing.assert_close(gx, leaf_x.grad, **TOL[torch.float32], msg=f"input's gradient after {change}")


@pytest.mark.parametrize("relu_in", [False, True])
def test_interval_linear_backward_after_input_change(relu_in):
    g = torch.Generator().manual_seed(7)
    center, radius = torch.randn(6, 12, generator=g), torch.rand(6, 12, generator=g)
    w = torch.randn(5, 12, generator=g)
    index, values = compressed(w, random_mask(w.shape, 0.6, torch.float32, "cpu", g))
    args = (index.row_ptr, index.col, 5, relu_in, False)
    a, _ = OPS.sparse_interval_linear(center, radius, values.detach().requires_grad_(True), None, *args)
    ga, gb = torch.randn(a.shape, generator=g), torch.rand(a.shape, generator=g)
    for change in (None, "center", "radius"):
        if change:
            with torch.no_grad():
                (center if change == "center" else radius).mul_(0.5)
        got = OPS.sparse_interval_linear_backward(ga, gb, center, radius, values, *args[:2], *index.csc, relu_in,
                                                  False, [False, False, True, False])[2]
        leaf = values.detach().requires_grad_(True)
        want_a, want_b = reference.sparse_interval_linear(center, radius, leaf, None, *args)
        torch.autograd.backward([want_a, want_b], [ga, gb])
        torch.testing.assert_close(got, leaf.grad, **TOL[torch.float32], msg=f"after changing {change}")
