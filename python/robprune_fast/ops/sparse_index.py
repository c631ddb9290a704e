"""The compressed weight of a pruned layer: its kept weights' indices, packed from the mask, and
their values, gathered from the weight.

For a weight of shape (out, ...) the 2-D view W2 = weight.view(out, -1) (in_features columns
for a linear layer, C_in / groups * kH * kW for a convolution) is kept twice:

- CSR over the rows (output channels): ``row_ptr`` int32 [out + 1], ``col`` int32 [nnz],
  columns sorted within each row, from which ``sparse_gather`` reads the values (a
  differentiable gather: a pruned weight gets exactly 0 gradient, made by ``sparse_scatter_``
  in one pass), and ``flat_index`` int64 [nnz] into weight.flatten() (``torch.take``'s index,
  for code outside the kernels);
- CSC over the columns, for the transposed products (input gradients, CROWN's steps):
  ``col_ptr`` int32 [cols + 1], ``row`` int32 [nnz], rows sorted within each column, and
  ``csc_to_csr`` int32 [nnz] (CSC entry e holds values[csc_to_csr[e]]).

Packing runs ATen ops only (any device), refuses a mask that is not binary (it reads the mask
anyway), and is cached per mask, keyed on the mask's identity and version counter: masks change
rarely (a pruning step), and only the mask's changes repack. Change masks through torch ops
(copy_, an in-place op under no_grad, load_state_dict), never through ``.data``, which the version
counter does not see. Values change with every optimiser step: they are gathered per call (an
O(nnz) pass), except inside ``ops.weight_cache()`` without grad, where they are gathered once per
weight version.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from . import weight_pair
from ._dispatch import OPS, _C, call, use_kernel


class SparseIndex(NamedTuple):
    """The indices of a mask's kept weights (see the module docstring); shape: W2's (rows, cols)."""

    shape: tuple[int, int]
    row_ptr: torch.Tensor
    col: torch.Tensor
    flat_index: torch.Tensor
    col_ptr: torch.Tensor
    row: torch.Tensor
    csc_to_csr: torch.Tensor

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.col_ptr, self.row, self.csc_to_csr


def _pointers(segment: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [count + 1] pointers of entries sorted by segment (each in [0, count))."""
    ptr = segment.new_zeros(count + 1, dtype=torch.long)
    ptr[1:].scatter_add_(0, segment, torch.ones_like(segment)).cumsum_(0)
    return ptr.int()


def _segment_of(ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The segment (CSR row, CSC column) of every entry, int64; shapes fixed by the inputs (no
    data-dependent shape, so this also traces under torch.compile)."""
    return torch.searchsorted(ptr[1:].long(), torch.arange(nnz, device=ptr.device), right=True)


def _csc(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
    """(col_ptr, row, csc_to_csr) of CSR entries at (rows, cols), both int64."""
    csc_to_csr = torch.argsort(cols * shape[0] + rows)
    return _pointers(cols, shape[1]), rows[csc_to_csr].int(), csc_to_csr.int()


def pack_mask(mask: torch.Tensor) -> SparseIndex:
    """The SparseIndex of a binary mask (out, ...); refuses a mask holding anything but 0 and 1."""
    m2 = mask.detach().reshape(mask.shape[0], math.prod(mask.shape[1:]))
    if not bool(((m2 == 0) | (m2 == 1)).all()):
        raise ValueError("mask must be binary (only 0 and 1) for the compressed path; scale weights "
                         "through the weight, or use path='dense'")
    shape = (m2.shape[0], m2.shape[1])
    rows, cols = m2.nonzero().unbind(1)  # row-major order: the CSR's
    if rows.numel() >= 2**31:
        raise ValueError(f"mask keeps {rows.numel()} weights; the compressed path holds fewer than 2^31")
    return _index(shape, _pointers(rows, shape[0]), cols.int(), rows, cols)


def index_of(row_ptr: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> SparseIndex:
    """The SparseIndex of a stored CSR (a compressed layer's buffers) of W2's `shape`, checked
    (pointers from 0 to nnz, never decreasing; columns in range, increasing within each row):
    ValueError naming what is wrong, so a damaged state dict is refused, not computed with."""
    rows_n, cols_n = shape
    for t, name in ((row_ptr, "row_ptr"), (col, "col")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor")
    if row_ptr.numel() != rows_n + 1:
        raise ValueError(f"row_ptr must have {rows_n + 1} entries (rows + 1), got {row_ptr.numel()}")
    p = row_ptr.long()
    if int(p[0]) != 0 or int(p[-1]) != col.numel() or bool((p[1:] < p[:-1]).any()):
        raise ValueError(f"row_ptr must rise from 0 to the number of kept weights ({col.numel()}) "
                         "without decreasing")
    rows = _segment_of(row_ptr, col.numel())
    cols = col.long()
    if col.numel() and (int(cols.min()) < 0 or int(cols.max()) >= cols_n):
        raise ValueError(f"col must lie in [0, {cols_n})")
    if bool(((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1])).any()):
        raise ValueError("col must increase within each row (sorted, no repeats)")
    return _index((rows_n, cols_n), row_ptr, col, rows, cols)


def _index(shape: tuple[int, int], row_ptr: torch.Tensor, col: torch.Tensor, rows: torch.Tensor,
           cols: torch.Tensor) -> SparseIndex:
    """The SparseIndex of the CSR (row_ptr, col), its entries at (rows, cols) (int64, row-major
    order); its CSC registered for the ops' autograd formulas (csc_of, csr_of)."""
    col_ptr, row, csc_to_csr = _csc(rows, cols, shape)
    index = SparseIndex(shape, row_ptr, col, rows * shape[1] + cols, col_ptr, row, csc_to_csr)
    _transposes[index.row_ptr] = (weakref.ref(index.col), index.csc)
    _transposes_back[index.col_ptr] = (weakref.ref(index.csc_to_csr), (index.row_ptr, index.col))
    return index


# The CSC of a CSR (and back) that pack_mask made, by the pointer tensor, for the autograd formulas
# of ops given one of the two (the weak reference checks the other half is the same tensor).
_transposes = WeakIdKeyDictionary()
_transposes_back = WeakIdKeyDictionary()


def csc_of(row_ptr: torch.Tensor, col: torch.Tensor, cols: int):
    """(col_ptr, row, csc_to_csr) of the CSR (row_ptr, col) with `cols` columns."""
    hit = _transposes.get(row_ptr)
    if hit is not None and hit[0]() is col:
        return hit[1]
    rows = _segment_of(row_ptr, col.numel())
    return _csc(rows, col.long(), (row_ptr.numel() - 1, cols))


def csr_of(col_ptr: torch.Tensor, row: torch.Tensor, csc_to_csr: torch.Tensor, rows: int):
    """(row_ptr, col) of the CSC (col_ptr, row, csc_to_csr) with `rows` rows."""
    hit = _transposes_back.get(col_ptr)
    if hit is not None and hit[0]() is csc_to_csr:
        return hit[1]
    cols = _segment_of(col_ptr, row.numel())
    col = torch.empty_like(cols).scatter_(0, csc_to_csr.long(), cols).int()
    return _pointers(row.long(), rows), col


def _version_key(t: torch.Tensor):
    """What identifies t's contents for a cache: its version counter and storage, or None when
    it has no version counter (an inference tensor: never cached)."""
    if t.is_inference() or isinstance(t, torch._subclasses.FakeTensor):
        return None
    return (t._version, t.data_ptr(), tuple(t.shape), t.dtype, t.device)


# mask -> (key, SparseIndex); always on (see the module docstring).
_index_cache = WeakIdKeyDictionary()
# mask -> (key, fraction kept)
_density_cache = WeakIdKeyDictionary()


def mask_index(mask: torch.Tensor) -> SparseIndex:
    """pack_mask(mask), cached per mask version."""
    key = _version_key(mask)
    hit = _index_cache.get(mask)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    index = pack_mask(mask)
    if key is not None:
        _index_cache[mask] = (key, index)
    return index


def mask_density(mask: torch.Tensor) -> float:
    """The fraction of nonzero entries of mask, cached per mask version."""
    key = _version_key(mask)
    hit = _density_cache.get(mask)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    density = float(torch.count_nonzero(mask)) / max(mask.numel(), 1)
    if key is not None:
        _density_cache[mask] = (key, density)
    return density


def _storage_uses(t: torch.Tensor) -> int:
    """How many tensors hold t's storage (counted by the same probe every time; the storage
    object is held while its count is read)."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata)


# weight -> the memory its last weight gradient was made in (CPU only, see _gradient_memory_for).
_gradient_memory = WeakIdKeyDictionary()


def _gradient_memory_for(weight: torch.Tensor, like: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(like), for weight's gradient, which sparse_scatter_ then writes in full.
    On the CPU a fresh dense gradient costs more than its whole compressed backward at high
    sparsity: the allocator hands back memory the kernel must fault in page by page (an 8 MiB
    linear weight: about 2 ms, against 0.2 ms to write memory already mapped). So the gradient
    is made in the memory of the last one made for the same weight once nothing else holds it
    (the optimiser's zero_grad(set_to_none=True) dropped it; counted by the storage's users, so
    a kept p.grad, a view of it or an accumulating backward gets fresh memory); the scatter
    writes every element, which is what makes reuse exact whatever was written into it
    meanwhile. Not while building a graph (create_graph), tracing, or under functorch
    transforms, nor on other devices, whose allocators keep their memory mapped."""
    reusable = (like.device.type == "cpu" and not torch.is_grad_enabled() and type(grad) is torch.Tensor
                and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(grad))
    if not reusable:
        return torch.empty_like(like)
    memory = _gradient_memory.get(weight)
    if (memory is not None and memory.shape == like.shape and memory.stride() == like.stride()
            and memory.dtype == like.dtype and _storage_uses(memory) == _ALONE):
        return memory.detach()
    memory = torch.empty_like(like)
    _gradient_memory[weight] = memory
    return memory.detach()


# What _storage_uses says of a tensor nothing else shares storage with.
_ALONE = _storage_uses(torch.empty(1))


def _gather(weight: torch.Tensor, index: SparseIndex) -> torch.Tensor:
    """sparse_gather (kernel, or twin where there is none); differentiable in weight."""
    if use_kernel("sparse_gather", weight.device):
        return call(OPS.sparse_gather, weight, index.row_ptr, index.col)
    return reference.sparse_gather(weight, index.row_ptr, index.col)


def _register_gather():
    @torch.library.register_fake("robprune_fast::sparse_gather")
    def _fake(weight, row_ptr, col):
        return weight.new_empty(col.shape)

    @torch.library.register_fake("robprune_fast::sparse_scatter_")
    def _fake_scatter(out, values, row_ptr, col):
        return None

    def setup(ctx, inputs, output):
        weight, row_ptr, col = inputs
        ctx.save_for_backward(row_ptr, col)
        ctx.weight = weight.detach()  # only its shape, dtype and layout are read
        ctx.key = weakref.ref(weight)

    def backward(ctx, grad):
        row_ptr, col = ctx.saved_tensors
        return dense_gradient(grad, ctx.weight, ctx.key(), row_ptr, col), None, None

    torch.library.register_autograd("robprune_fast::sparse_gather", backward, setup_context=setup)


def dense_gradient(grad: torch.Tensor, like: torch.Tensor, weight: torch.Tensor | None, row_ptr: torch.Tensor,
                   col: torch.Tensor) -> torch.Tensor:
    """sparse_gather's backward: the kept values' gradient grad put back into a dense one shaped
    like `like` (the weight, detached), zeros elsewhere, in one pass (sparse_scatter_), where
    torch.take's own backward zeroes and then accumulates; in the memory of the weight's last
    gradient where nothing holds it (_gradient_memory_for; weight: the weight, None once it is
    gone). With create_graph, or a weight the kernel does not write in place (not contiguous:
    channels-last), the differentiable twin."""
    if torch.is_grad_enabled() or not like.is_contiguous():
        return reference.csr_dense(grad, row_ptr, col, math.prod(like.shape[1:])).view(like.shape)
    out = torch.empty_like(like) if weight is None else _gradient_memory_for(weight, like, grad)
    OPS.sparse_scatter_(out, grad, row_ptr, col)
    return out


if _C is not None:
    _register_gather()


# weight -> (key, flat_index weakref, values): inside weight_cache() scopes only, without grad.
_value_cache = WeakIdKeyDictionary()
weight_pair.on_scope_exit(_value_cache.clear)


def gather_values(weight: torch.Tensor, index: SparseIndex) -> torch.Tensor:
    """The kept weights, values = weight.flatten()[flat_index], differentiable in weight; inside
    weight_cache() and without grad, gathered once per weight version."""
    if (torch.is_grad_enabled() and weight.requires_grad) or not weight_pair.caching():
        return _gather(weight, index)
    key = _version_key(weight)
    hit = _value_cache.get(weight)
    if key is not None and hit is not None and hit[0] == key and hit[1]() is index.flat_index:
        return hit[2]
    values = _gather(weight.detach(), index)
    if key is not None:
        _value_cache[weight] = (key, weakref.ref(index.flat_index), values)
    return values
