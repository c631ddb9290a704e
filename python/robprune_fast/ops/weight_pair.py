"""W * M and |W * M|, the two weights an interval layer multiplies by, made in one pass
(``masked_weight_pair``) and, inside ``weight_cache()``, once per weight update."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import reference
from ._dispatch import OPS, _C, use_kernel
from .checks import check_same_shape, check_tensor


def masked_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A (2, *weight.shape) tensor holding weight * mask and |weight * mask|, in one pass."""
    check_tensor(weight, "weight")
    if mask is not None:
        check_tensor(mask, "mask", weight, "weight")
        check_same_shape(mask, "mask", weight, "weight")
    if use_kernel("masked_weight_pair", weight.device):
        return OPS.masked_weight_pair(weight, mask)
    return reference.masked_weight_pair(weight, mask)


def _suggested_format(t: torch.Tensor) -> torch.memory_format:
    """Python twin of ATen's suggest_memory_format for dense 4-D tensors."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


if _C is not None:
    @torch.library.register_fake("robprune_fast::masked_weight_pair")
    def _fake_masked_weight_pair(weight, mask):
        # Each half is laid out like the weight (channels_last stays channels_last).
        half = torch.empty_like(weight, memory_format=_suggested_format(weight))
        return weight.new_empty_strided((2, *weight.shape), (weight.numel(), *half.stride()))


# weight -> (key, mask weakref, pair), filled only inside weight_cache() scopes. Keyed on the
# tensors' version counters, which every in-place update made through autograd-visible ops
# bumps (optimiser steps, copy_, load_state_dict). Writes through `.data` bypass the counter,
# and a stale |W * M| would give bounds for the wrong weights: hence a scope the caller opens
# where it knows weights only change the visible way (evaluation, verification, PGD on bounds),
# rather than a cache that is always on. The ops check every pair they are given against the
# pairs masked_weight_pair recorded in C++ (csrc/interval/weight_pair_registry.h): O(1) for the
# ones made here, so a pair from this cache costs no pass over the weights.
_pair_cache = WeakIdKeyDictionary()
_cache_depth = 0
# Other caches that live as long as a weight_cache() scope (the compressed path's values,
# ops.sparse_index): cleared with the pairs when the outermost scope closes.
_scope_caches = [_pair_cache.clear]


def on_scope_exit(clear) -> None:
    """Call clear() whenever the outermost weight_cache() scope closes."""
    _scope_caches.append(clear)


def caching() -> bool:
    """Whether a weight_cache() scope is open (and this is no trace, where nothing is cached)."""
    return _cache_depth > 0 and not torch.compiler.is_compiling()


@contextlib.contextmanager
def weight_cache():
    """Within this scope the interval ops make W * M and |W * M| once per weight update and
    reuse them across calls. Inside it, change weights and masks only through torch ops (an
    optimiser step, copy_, load_state_dict), never through ``.data``."""
    global _cache_depth
    _cache_depth += 1
    try:
        yield
    finally:
        _cache_depth -= 1
        if _cache_depth == 0:
            for clear in _scope_caches:
                clear()


def cached_weight_pair(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The pair of (weight, mask) from the cache (made on a miss), or None outside
    weight_cache() and while tracing, where the kernel makes the pair itself."""
    if _cache_depth == 0 or torch.compiler.is_compiling() or isinstance(weight, torch._subclasses.FakeTensor):
        return None
    key = (weight._version, weight.data_ptr(), None if mask is None else (mask._version, mask.data_ptr()))
    hit = _pair_cache.get(weight)
    # A weak reference to the mask, not its id: a new mask may reuse a freed one's address.
    if hit is not None and hit[0] == key and (hit[1]() if hit[1] is not None else None) is mask:
        return hit[2]
    # Outside inference mode even inside it: an inference tensor has no version counter, and the
    # ops recognise a pair without a pass over the weights only by its version.
    with torch.no_grad(), torch.inference_mode(False):
        pair = OPS.masked_weight_pair(weight.detach(), None if mask is None else mask.detach())
    _pair_cache[weight] = (key, None if mask is None else weakref.ref(mask), pair)
    return pair
