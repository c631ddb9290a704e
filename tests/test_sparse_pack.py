"""Packing a mask into the compressed path's indices (ops.sparse_index): the round trip to the
dense weight through CSR and CSC, the binary check, the index transposes the autograd formulas
rebuild, and the caches following mask and weight updates."""
import pytest
import torch

from robprune_fast import ops, reference
from robprune_fast.ops import sparse_index
from tests.helpers.masked import random_mask

SHAPES = [(7, 11), (6, 3, 3, 2), (5, 0), (1, 1)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(shape, sparsity):
    w = torch.randn(shape, dtype=torch.float64)
    m = random_mask(shape, sparsity, torch.float64, "cpu")
    index = sparse_index.pack_mask(m)
    rows, cols = shape[0], w[0].numel()
    assert index.shape == (rows, cols) and index.nnz == int(m.sum())
    values = torch.take(w, index.flat_index)
    want = (w * m).reshape(rows, cols)
    torch.testing.assert_close(reference.csr_dense(values, index.row_ptr, index.col, cols), want, rtol=0, atol=0)
    torch.testing.assert_close(reference.csc_dense(values, *index.csc, rows), want, rtol=0, atol=0)
    assert all(t.dtype == torch.int32 for t in (index.row_ptr, index.col, *index.csc))
    assert sorted(index.csc_to_csr.tolist()) == list(range(index.nnz))
    for ptr, inner in ((index.row_ptr, index.col), (index.col_ptr, index.row)):  # sorted within segments
        for s in range(ptr.numel() - 1):
            seg = inner[ptr[s]:ptr[s + 1]]
            assert bool((seg[1:] > seg[:-1]).all())


def test_channels_last_weight_gathers_in_logical_order():
    w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    m = random_mask(w.shape, 0.5, torch.float32, "cpu")
    index = sparse_index.pack_mask(m)
    torch.testing.assert_close(torch.take(w, index.flat_index), (w * m).flatten()[(m.flatten() == 1)])


@pytest.mark.parametrize("value", [0.5, -1.0, 2.0, float("nan")])
def test_mask_must_be_binary(value):
    m = torch.ones(3, 4)
    m[1, 2] = value
    with pytest.raises(ValueError, match="mask must be binary"):
        sparse_index.pack_mask(m)
    with pytest.raises(ValueError, match="mask must be binary"):
        ops.masked_linear(torch.randn(2, 4), torch.randn(3, 4), None, m, path="sparse")


def test_transposes_rebuilt_match_the_packed_ones():
    m = random_mask((9, 13), 0.6, torch.float32, "cpu")
    index = sparse_index.pack_mask(m)
    rebuilt = sparse_index.csc_of(index.row_ptr.clone(), index.col.clone(), 13)  # not the packed tensors
    for a, b in zip(rebuilt, index.csc):
        assert torch.equal(a, b)
    back = sparse_index.csr_of(index.col_ptr.clone(), index.row.clone(), index.csc_to_csr.clone(), 9)
    assert torch.equal(back[0], index.row_ptr) and torch.equal(back[1], index.col)
    # the packed tensors themselves: found, not recomputed
    assert all(a is b for a, b in zip(sparse_index.csc_of(index.row_ptr, index.col, 13), index.csc))


def test_index_cache_follows_the_mask():
    m = random_mask((8, 10), 0.5, torch.float32, "cpu")
    first = sparse_index.mask_index(m)
    assert sparse_index.mask_index(m) is first  # unchanged: no repack
    m.copy_(random_mask((8, 10), 0.9, torch.float32, "cpu"))
    second = sparse_index.mask_index(m)
    assert second is not first and second.nnz == int(m.sum())
    with torch.no_grad():
        m[0].zero_()
    assert sparse_index.mask_index(m).nnz == int(m.sum())


def test_masked_layer_follows_mask_and_weight_updates():
    """ops.masked_linear on the compressed path after the mask and the weight change in place
    (a pruning step, an optimiser step) computes with the new ones."""
    x, w, b = torch.randn(4, 10), torch.randn(6, 10), torch.randn(6)
    m = random_mask(w.shape, 0.5, torch.float32, "cpu")
    for _ in range(2):
        want = torch.nn.functional.linear(x, w * m, b)
        torch.testing.assert_close(ops.masked_linear(x, w, b, m, path="sparse"), want)
        with ops.weight_cache(), torch.no_grad():
            torch.testing.assert_close(ops.masked_linear(x, w, b, m, path="sparse"), want)
        with torch.no_grad():
            w.add_(1.0)
            m.copy_(random_mask(w.shape, 0.7, torch.float32, "cpu"))


def test_values_cached_per_weight_version_inside_weight_cache():
    w = torch.randn(6, 10, requires_grad=True)
    index = sparse_index.pack_mask(random_mask(w.shape, 0.5, torch.float32, "cpu"))
    with torch.no_grad():
        assert sparse_index.gather_values(w, index) is not sparse_index.gather_values(w, index)  # outside: fresh
        with ops.weight_cache():
            first = sparse_index.gather_values(w, index)
            assert sparse_index.gather_values(w, index) is first
            w.mul_(2)
            second = sparse_index.gather_values(w, index)
            assert second is not first
            torch.testing.assert_close(second, torch.take(w, index.flat_index))
    assert len(sparse_index._value_cache) == 0  # cleared with the scope
    with ops.weight_cache():  # with grad, gathered each call (differentiable)
        assert sparse_index.gather_values(w, index).requires_grad


def test_density_cache():
    m = random_mask((10, 10), 0.75, torch.float32, "cpu")
    assert sparse_index.mask_density(m) == int(m.sum()) / 100
    m.fill_(1.0)
    assert sparse_index.mask_density(m) == 1.0


def _gather_backward(w, index, seed):
    """w's gradient through gather_values, for values' gradient drawn from seed; and that
    gradient's expected value (zeros but at the kept weights)."""
    g = torch.randn(index.nnz, generator=torch.Generator().manual_seed(seed))
    sparse_index.gather_values(w, index).backward(g)
    return torch.zeros_like(w).put_(index.flat_index, g)


def test_weight_gradient_memory_is_reused_only_when_nothing_holds_it():
    # A fresh dense weight gradient per backward faults its pages in; the compressed path makes it
    # in the memory of the weight's last one when nothing else holds that memory any more.
    w = torch.randn(16, 32, requires_grad=True)
    index = sparse_index.pack_mask(random_mask(w.shape, 0.75, torch.float32, "cpu"))
    want = _gather_backward(w, index, 0)
    torch.testing.assert_close(w.grad, want, rtol=0, atol=0)
    memory = sparse_index._gradient_memory[w]  # the same tensor: no further user of its storage
    assert w.grad.data_ptr() == memory.data_ptr()
    w.grad = None  # zero_grad(set_to_none=True): the memory is free, so it is used again
    want = _gather_backward(w, index, 1)
    torch.testing.assert_close(w.grad, want, rtol=0, atol=0)
    assert sparse_index._gradient_memory[w] is memory and w.grad.data_ptr() == memory.data_ptr()

    # Accumulation without zero_grad: the kept gradient holds the memory, a second backward adds
    # into it from fresh memory.
    kept = w.grad.clone()
    want = _gather_backward(w, index, 2)
    torch.testing.assert_close(w.grad, kept + want, rtol=0, atol=0)
    assert sparse_index._gradient_memory[w] is not memory

    # A view of an old gradient keeps its values through later backward calls.
    w.grad = None
    _gather_backward(w, index, 3)
    view, snapshot = w.grad.view(-1), w.grad.clone()
    w.grad = None
    _gather_backward(w, index, 4)
    torch.testing.assert_close(view.view_as(snapshot), snapshot, rtol=0, atol=0)
    assert w.grad.data_ptr() != view.data_ptr()


def test_reused_weight_gradient_memory_is_zeroed_in_full():
    # Whatever was written into a released gradient (through .data, which no version counter sees),
    # a pruned weight's gradient stays exactly 0.
    w = torch.randn(8, 8, requires_grad=True)
    index = sparse_index.pack_mask(random_mask(w.shape, 0.5, torch.float32, "cpu"))
    _gather_backward(w, index, 0)
    w.grad.data.fill_(7.0)
    w.grad = None
    want = _gather_backward(w, index, 1)
    torch.testing.assert_close(w.grad, want, rtol=0, atol=0)


def test_weight_gradient_with_create_graph_is_fresh_and_differentiable():
    w = torch.randn(8, 8, requires_grad=True)
    index = sparse_index.pack_mask(random_mask(w.shape, 0.5, torch.float32, "cpu"))
    values = sparse_index.gather_values(w, index)
    (grad,) = torch.autograd.grad((values ** 2).sum(), w, create_graph=True)
    torch.testing.assert_close(grad, torch.zeros_like(w).put_(index.flat_index, 2 * values.detach()))
    (second,) = torch.autograd.grad(grad.sum(), w)
    torch.testing.assert_close(second, torch.zeros_like(w).put_(index.flat_index, torch.full_like(values, 2.0)))


def test_pruned_weights_stay_zero_under_sgd_with_reused_gradient_memory():
    # Momentum and weight decay read the gradient each step; a pruned weight's gradient is 0 in
    # every one, so a weight pruned at zero never moves.
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 12)
    m = random_mask(layer.weight.shape, 0.8, torch.float32, "cpu")
    with torch.no_grad():
        layer.weight.mul_(m)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(5, 24)
    for _ in range(6):
        opt.zero_grad()
        ops.masked_linear(x, layer.weight, layer.bias, m, path="sparse").square().sum().backward()
        assert bool((layer.weight.grad[m == 0] == 0).all())
        opt.step()
    assert bool((layer.weight[m == 0] == 0).all())
