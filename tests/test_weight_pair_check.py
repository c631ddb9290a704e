"""The ops that take a cached weight_pair (interval_linear, interval_conv2d,
crown_linear_backward, crown_conv2d_backward, and their backward ops) refuse, through torch.ops,
any pair that is not masked_weight_pair(weight, mask): another weight's, a tampered one, one
whose weight, mask or pair changed in place since it was made. The pairs masked_weight_pair made
are recognised without a pass over the weights; a foreign pair equal to the real one is
accepted (checked once by recomputing it)."""
import gc

import pytest
import torch

from tests.helpers.ops import DEVICES
from robprune_fast import ops, reference
from robprune_fast.ops import _C, weight_pair

OPS = torch.ops.robprune_fast
REFUSED = r"weight_pair must be masked_weight_pair\(weight, mask\)"


def linear_call(op, weight, mask, pair):
    c = torch.randn(3, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return op(c, torch.rand_like(c), weight, None, mask, pair, True, True)


def conv_call(op, weight, mask, pair):
    c = torch.randn(2, weight.shape[1], 6, 6, dtype=weight.dtype, device=weight.device)
    return op(c, torch.rand_like(c), weight, None, mask, pair, [1, 1], [1, 1], [1, 1], 1, True, True)


def crown_linear_call(op, weight, mask, pair):
    A = torch.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return op(A, weight, None, mask, pair)


def crown_conv_call(op, weight, mask, pair):
    A = torch.randn(2, weight.shape[0], 6, 6, dtype=weight.dtype, device=weight.device)
    return op(A, weight, None, mask, pair, [6, 6], [1, 1], [1, 1], [1, 1], 1)


def linear_backward_call(op, weight, mask, pair):
    c = torch.randn(3, weight.shape[1], dtype=weight.dtype, device=weight.device)
    g = torch.randn(3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return op(g, g, c, torch.rand_like(c), weight, mask, pair, True, True, [True] * 5)


def crown_linear_grad_call(op, weight, mask, pair):
    A = torch.randn(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
    G = torch.randn(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return op(G, torch.randn(2, dtype=weight.dtype, device=weight.device), A, weight, None, mask,
              pair, [True] * 4)


# (op, weight shape, call)
CASES = {
    "interval_linear": ((4, 5), linear_call),
    "interval_conv2d": ((4, 3, 3, 3), conv_call),
    "crown_linear_backward": ((4, 5), crown_linear_call),
    "crown_conv2d_backward": ((4, 3, 3, 3), crown_conv_call),
    "interval_linear_backward": ((4, 5), linear_backward_call),
    "crown_linear_backward_grad": ((4, 5), crown_linear_grad_call),
}


def layer(name, device, dtype=torch.float32):
    shape, call = CASES[name]
    weight = torch.randn(shape, dtype=dtype, device=device)
    mask = (torch.rand(shape, device=device) > 0.3).to(dtype)
    return getattr(OPS, name), call, weight, mask


def run(name, device, tamper):
    """Calls op `name` with the pair tamper(weight, mask, pair) returns (it may change weight,
    mask or pair in place first)."""
    op, call, weight, mask = layer(name, device)
    pair = OPS.masked_weight_pair(weight.detach(), mask.detach())
    return call(op, weight, mask, tamper(weight, mask, pair))


def other_weights_pair(weight, mask, pair):
    return OPS.masked_weight_pair(torch.randn_like(weight), mask)


def negated_abs_half(weight, mask, pair):
    return torch.stack([pair[0], -pair[1]])


def weight_changed_in_place(weight, mask, pair):
    with torch.no_grad():
        weight.add_(1)
    return pair


def mask_changed_in_place(weight, mask, pair):
    mask.fill_(1)
    return pair


def pair_changed_in_place(weight, mask, pair):
    pair[1].mul_(0.5)
    return pair


BAD = [other_weights_pair, negated_abs_half, weight_changed_in_place, mask_changed_in_place,
       pair_changed_in_place]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("tamper", BAD, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", list(CASES))
def test_refused(name, tamper, device):
    with pytest.raises(RuntimeError, match=REFUSED):
        run(name, device, tamper)


@pytest.mark.parametrize("name", list(CASES))
def test_pair_with_a_mask_refused_without_it(name):
    op, call, weight, mask = layer(name, "cpu")
    mask[0].zero_()  # so weight * mask differs from weight
    pair = OPS.masked_weight_pair(weight, mask)
    with pytest.raises(RuntimeError, match=REFUSED):
        call(op, weight, None, pair)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_accepted(name, device):
    """The pair masked_weight_pair made (through a detached alias, as the Python cache makes
    it), a foreign but equal pair (the twin's), and no pair at all give the same results."""
    op, call, weight, mask = layer(name, device, torch.float64)
    results = []
    for pair in (None, OPS.masked_weight_pair(weight.detach(), mask.detach()),
                 reference.masked_weight_pair(weight, mask)):
        torch.manual_seed(0)
        results.append(call(op, weight, mask, pair))
    for got in results[1:]:
        for g, w in zip(got, results[0]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_equal_values_after_an_in_place_write_accepted():
    """A write that leaves the weight's values as they were moves its version: the pair is then
    checked by recomputing it, and still accepted."""
    op, call, weight, mask = layer("interval_linear", "cpu")
    pair = OPS.masked_weight_pair(weight, mask)
    weight.mul_(1)
    call(op, weight, mask, pair)


def test_weight_cache_path_still_works():
    """The Python wrappers inside weight_cache() pass their cached pair through these checks,
    across an optimiser step (a new pair is made after it)."""
    weight = torch.nn.Parameter(torch.randn(4, 5))
    mask = (torch.rand(4, 5) > 0.3).float()
    opt = torch.optim.SGD([weight], lr=0.1)
    c, r = torch.randn(3, 5), torch.rand(3, 5)
    with ops.weight_cache():
        for _ in range(3):
            lo, up = ops.interval_linear(c, r, weight, None, mask, relu_in=True, out_bounds=True)
            torch.testing.assert_close((lo, up), reference.interval_linear(c, r, weight, None, mask,
                                                                           True, True))
            A, _ = ops.crown_linear_backward(torch.randn(2, 4), weight, None, mask)
            (up.sum() + A.sum()).backward()
            opt.step()
            opt.zero_grad()


def test_cached_pair_has_a_version_under_inference_mode():
    """Inside inference mode the Python cache still makes a pair with a version counter (not an
    inference tensor), which the ops recognise without a pass over the weights."""
    weight, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
    with torch.inference_mode(), ops.weight_cache():
        lo, up = ops.interval_linear(torch.randn(3, 5), torch.rand(3, 5), weight, None, mask, out_bounds=True)
        pair = weight_pair._pair_cache[weight][2]
        assert not pair.is_inference()
        assert bool((lo <= up).all())


def test_registry_keeps_live_pairs_and_forgets_dead_ones():
    """Each live pair has its own entry (a foreign one too, once checked); pairs that died (and
    pairs whose weight died) leave: the registry never grows without bound however many pairs
    are made."""
    gc.collect()
    before = _C._recorded_weight_pairs()
    weights = [torch.randn(8, 8) for _ in range(3)]
    kept = [OPS.masked_weight_pair(w, None) for w in weights]
    assert _C._recorded_weight_pairs() >= before + 3
    foreign = reference.masked_weight_pair(weights[0], None)
    OPS.crown_linear_backward(torch.randn(2, 8), weights[0], None, None, foreign)
    assert _C._recorded_weight_pairs() >= before + 4
    for _ in range(5000):
        OPS.masked_weight_pair(torch.randn(2, 2), None)
    assert 4 <= _C._recorded_weight_pairs() < 1000  # the four live pairs survived the sweeps
    assert len(kept) == 3 and foreign.shape == (2, 8, 8)
