"""Tests of robprune_fast.bounds: soundness, exactness, tightness, certificates against attacks,
chunking under a memory cap, batch-norm modes and argument checks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from robprune_fast import bounds, models, ops, reference
from robprune_fast.bounds import crown_steps as bound_steps
from tests.helpers.bound_models import (TOL64, ball_samples, cnn, inputs, maxpool_cnn, mlp, randomise_bn,
                                        resnet)

METHODS = bounds.METHODS


# --------------------------------------------------------------------------------------------------
# helpers


def _pgd(f, x, eps, steps=40, restarts=1, step=None):
    """Maximise f(x') (summed over the batch) over the clipped ball; returns the best points."""
    step = eps / 4 if step is None else step
    best, best_val = x.clone(), f(x).detach()
    for _ in range(restarts):
        xa = (x + eps * (torch.rand_like(x) * 2 - 1)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            val = f(xa)
            (g,) = torch.autograd.grad(val.sum(), xa)
            with torch.no_grad():
                xa = torch.minimum(torch.maximum(xa + step * g.sign(), x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            val = f(xa)
            better = val > best_val
            best[better] = xa[better]
            best_val = torch.maximum(best_val, val)
    return best


def _outputs(model, C):
    return (lambda x: model(x)) if C is None else (lambda x: (C @ model(x).unsqueeze(-1)).squeeze(-1))


def _assert_sound(model, x, eps, method, C=None, n=1000, pgd_steps=30):
    lower, upper = bounds.compute_bounds(model, x, eps, method, C)
    out = _outputs(model, C)
    with torch.no_grad():
        ys = torch.stack([out(p) for p in ball_samples(x, eps, n)])
    assert (ys >= lower - TOL64).all() and (ys <= upper + TOL64).all()
    # PGD pushes every output coordinate up and down.
    for k in range(lower.shape[1]):
        for sign in (1.0, -1.0):
            xa = _pgd(lambda z: sign * out(z)[:, k], x, eps, steps=pgd_steps)
            with torch.no_grad():
                y = out(xa)[:, k]
            assert (y >= lower[:, k] - TOL64).all() and (y <= upper[:, k] + TOL64).all()
    return lower, upper


# --------------------------------------------------------------------------------------------------
# soundness


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
def test_sound_on_all_layers(build, method):
    model = build()
    x = inputs((1, 6, 6) if build is mlp else (2, 10, 10))
    _assert_sound(model, x, 0.06, method)
    C = bounds.margin_spec(torch.tensor([0, 1, 2]), 5 if build is mlp else 4, torch.float64)
    _assert_sound(model, x, 0.06, method, C, n=300, pgd_steps=15)


@pytest.mark.parametrize("build", [maxpool_cnn, resnet], ids=["maxpool", "resnet"])
def test_sound_ibp_only_layers(build):
    model = build()
    x = inputs((1, 8, 8))
    _assert_sound(model, x, 0.05, "ibp")
    for method in ("crown-ibp", "crown"):
        with pytest.raises(NotImplementedError, match="MaxPool|PreActBlock|method='ibp'"):
            bounds.compute_bounds(model, x, 0.05, method)


def test_intersected_crown_is_sound_and_at_least_as_tight():
    model, x = cnn(), inputs((2, 10, 10))
    lower, upper = _assert_sound(model, x, 0.08, "crown", n=300, pgd_steps=10)
    li, ui = bounds.compute_bounds(model, x, 0.08, "crown", intersect_ibp=True)
    li2, ui2 = bounds.compute_bounds(model, x, 0.08, "crown", intersect_ibp=True)
    assert torch.equal(li, li2) and torch.equal(ui, ui2)
    lo_ibp, up_ibp = bounds.compute_bounds(model, x, 0.08, "ibp")
    assert (li >= torch.maximum(lower, lo_ibp) - 1e-9).all()
    assert (ui <= torch.minimum(upper, up_ibp) + 1e-9).all()
    out = model(ball_samples(x, 0.08, 400).flatten(0, 1)).view(400, *li.shape)
    assert (out >= li - TOL64).all() and (out <= ui + TOL64).all()


def test_float32_bounds_are_sound_within_tolerance():
    model = cnn().float()
    x = inputs((2, 10, 10)).float()
    for method in METHODS:
        lower, upper = bounds.compute_bounds(model, x, 0.05, method)
        assert lower.dtype == torch.float32
        with torch.no_grad():
            ys = torch.stack([model(p) for p in ball_samples(x, 0.05, 300)])
        assert (ys >= lower - 1e-4).all() and (ys <= upper + 1e-4).all()


def test_zero_eps_gives_the_output():
    model, x = cnn(), inputs((2, 10, 10))
    for method in METHODS:
        lower, upper = bounds.compute_bounds(model, x, 0.0, method)
        assert torch.allclose(lower, model(x), atol=1e-10)
        assert torch.allclose(upper, model(x), atol=1e-10)


# --------------------------------------------------------------------------------------------------
# exactness and tightness


def test_folded_specification_shared_and_per_input_agree():
    """IBP with C folded into the last layer: a batch with few distinct specifications (the
    shared-GEMM path) gives the bounds each input gets alone (the per-input path)."""
    model = mlp()
    torch.manual_seed(6)
    x = inputs((1, 6, 6), n=24)
    y = torch.tensor([0, 3, 1] * 8)  # 3 distinct margin specifications for 24 inputs
    C = bounds.margin_spec(y, 5, dtype=torch.float64)
    assert 3 * bounds.ibp.DISTINCT_SPEC_FRACTION <= 24
    lower, upper = bounds.compute_bounds(model, x, 0.05, "ibp", C)
    for i in range(24):
        lo, up = bounds.compute_bounds(model, x[i:i + 1], 0.05, "ibp", C[i:i + 1])
        torch.testing.assert_close(lower[i:i + 1], lo, atol=TOL64, rtol=0)
        torch.testing.assert_close(upper[i:i + 1], up, atol=TOL64, rtol=0)


def test_colliding_specifications_are_not_grouped():
    """Two different C whose grouping keys collide are caught by the exact check: the folded
    last layer then takes the per-input path and each input keeps its own C."""
    model = mlp()
    x = inputs((1, 6, 6), n=8)
    C = torch.zeros(8, 1, 5, dtype=torch.float64)
    C[::2, 0, 0] = 2.0   # key 2 * 1
    C[1::2, 0, 4] = 1.0  # key 1 * 2: the same key, another specification
    assert bounds.ibp.distinct_specs(C) == (None, None)
    lower, upper = bounds.compute_bounds(model, x, 0.05, "ibp", C)
    for i in range(8):
        lo, up = bounds.compute_bounds(model, x[i:i + 1], 0.05, "ibp", C[i:i + 1])
        torch.testing.assert_close(lower[i:i + 1], lo, atol=TOL64, rtol=0)
        torch.testing.assert_close(upper[i:i + 1], up, atol=TOL64, rtol=0)


@pytest.mark.parametrize("build,shape", [(mlp, (1, 6, 6)), (cnn, (2, 8, 8)),
                                         (maxpool_cnn, (1, 8, 8)), (resnet, (1, 8, 8))],
                         ids=["mlp", "cnn", "maxpool", "resnet"])
@pytest.mark.parametrize("with_spec", [False, True], ids=["logits", "margins"])
def test_ibp_without_autograd_maps_relus_in_place(build, shape, with_spec, monkeypatch):
    """compute_bounds' IBP without autograd ReLUs its own boxes in place (ops.unchecked.relu_box_):
    the same exact-arithmetic bounds, bit for bit, as the path that keeps every pre-activation
    box (bound_details), and neither x nor the model changes. Sound, the two paths widen a box
    after a ReLU from different readings (the post-ReLU box, the pre-ReLU one), so they agree
    to rounding and both hold the exact bounds. With autograd it stays functional."""
    model = build()
    x = inputs(shape, n=4)
    with torch.no_grad():
        classes = model(x).shape[1]
    C = bounds.margin_spec(torch.tensor([0, 2, 1, 0]), classes, torch.float64) if with_spec else None
    x_before, params_before = x.clone(), [p.clone() for p in model.state_dict().values()]
    calls = []
    real = ops.unchecked.relu_box_
    monkeypatch.setattr(ops.unchecked, "relu_box_", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        lower, upper = bounds.compute_bounds(model, x, 0.05, "ibp", C, sound=False)
        assert calls, "the in-place path was not taken"
        details = bounds.bound_details(model, x, 0.05, "ibp", C, sound=False)
        assert torch.equal(lower, details.lower) and torch.equal(upper, details.upper)
        sound_lower, sound_upper = bounds.compute_bounds(model, x, 0.05, "ibp", C)
        sound = bounds.bound_details(model, x, 0.05, "ibp", C)
    for lo, up in ((sound_lower, sound_upper), (sound.lower, sound.upper)):
        assert (lo < lower).all() and (up > upper).all()
        torch.testing.assert_close(lo, lower, rtol=0, atol=1e-12)
        torch.testing.assert_close(up, upper, rtol=0, atol=1e-12)
    assert torch.equal(x, x_before)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), params_before))
    calls.clear()
    bounds.compute_bounds(model, x, 0.05, "ibp", C, differentiable=True)  # autograd: functional
    assert not calls


def test_one_linear_layer_is_exact_for_every_method():
    torch.manual_seed(5)
    model = nn.Sequential(models.Normalize((0.3, 0.6), (0.2, 0.4)), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 6)).double()
    prune.random_unstructured(model[2], "weight", amount=0.4)
    x, eps = inputs((2, 4, 4), n=4), 0.1
    lo_in, up_in = (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)
    # x -> W ((x - mean) / std) + b is affine in pixel space: x -> V x + d.
    std = model[0].std.expand(2, 4, 4).flatten()
    mean = model[0].mean.expand(2, 4, 4).flatten()
    V = model[2].weight / std
    d = model[2].bias - V @ mean
    for C in (bounds.margin_spec(torch.tensor([0, 5, 2, 2]), 6, torch.float64),
              torch.randn(4, 3, 6, dtype=torch.float64), None):
        G = torch.eye(6, dtype=torch.float64).expand(4, 6, 6) if C is None else C
        rows = G @ V                                   # (B, S, n)
        const = (G @ d.unsqueeze(-1)).squeeze(-1)
        exact_lo = const + torch.where(rows > 0, rows * lo_in[:, None], rows * up_in[:, None]).sum(-1)
        exact_up = const + torch.where(rows > 0, rows * up_in[:, None], rows * lo_in[:, None]).sum(-1)
        for method in METHODS:
            lower, upper = bounds.compute_bounds(model, x, eps, method, C)
            assert torch.allclose(lower, exact_lo, atol=1e-10), method
            assert torch.allclose(upper, exact_up, atol=1e-10), method


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _deep_mlp():
    """Three layers, so that CROWN's intermediate bounds differ from IBP's."""
    return nn.Sequential(models.Normalize(models.DIGITS_MEAN, models.DIGITS_STD), nn.Flatten(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _train(model, x, y, steps, eps=0.0, kappa=1.0):
    """Adam on kappa * clean CE + (1 - kappa) * IBP-margin CE (eps ramped up over the first half)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss = kappa * F.cross_entropy(model(x), y)
        if eps > 0:
            e = eps * min(1.0, 2 * step / steps)
            C = bounds.margin_spec(y, 10)
            lower = bounds.training_bounds(model, x, e, C).ibp_lower
            # The worst-case logits: 0 for the label, -margin lower bound for the others.
            loss = loss + (1 - kappa) * F.cross_entropy(
                torch.cat([torch.zeros_like(lower[:, :1]), -lower], 1), torch.zeros_like(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_crown_margins_tighter_on_average_on_a_trained_model():
    x, y, xt, yt = _digits()
    torch.manual_seed(0)
    model = _train(_deep_mlp(), x, y, steps=150)
    C = bounds.margin_spec(yt, 10)
    means = {m: bounds.compute_bounds(model, xt, 0.02, m, C, upper=False)[0].mean().item()
             for m in METHODS}
    assert means["crown"] > means["crown-ibp"] and means["crown"] > means["ibp"], means


def test_no_certified_point_is_broken_by_pgd():
    x, y, xt, yt = _digits()
    torch.manual_seed(0)
    eps = 0.03
    model = _train(_deep_mlp(), x, y, steps=200, eps=eps, kappa=0.5)
    xt, yt = xt[:150], yt[:150]
    for method in METHODS:
        result = bounds.verified_accuracy(model, xt, yt, eps, method)
        assert result.verified.sum() >= 10, (method, result.verified_accuracy)
        assert not (result.verified & ~result.correct).any()
        xv, yv = xt[result.verified], yt[result.verified]
        C = bounds.margin_spec(yv, 10)

        def neg_margin(z):  # maximised by PGD: the worst margin, negated
            return -(C @ model(z).unsqueeze(-1)).squeeze(-1).min(1).values

        xa = _pgd(neg_margin, xv, eps, steps=100, restarts=3)
        assert (xa - xv).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        with torch.no_grad():
            assert (model(xa).argmax(1) == yv).all(), method
            assert (neg_margin(xa) <= -result.margin_lower[result.verified].min(1).values
                    + 1e-4).all()


def test_verified_accuracy_reports_unstable_relus():
    model, x = cnn(), inputs((2, 10, 10), n=4)
    y = model(x).argmax(1)
    result = bounds.verified_accuracy(model, x, y, 0.05, "crown")
    assert result.correct.all()
    assert list(result.unstable) == ["3", "5", "8", "12"]  # one ReLU instance at "3" and "5"
    assert result.neurons["3"] == 6 * 5 * 5
    assert all(0 <= v <= 4 * result.neurons[k] for k, v in result.unstable.items())
    assert sum(result.unstable.values()) > 0
    tight = bounds.verified_accuracy(model, x, y, 0.0, "ibp")
    assert tight.verified.all() and sum(tight.unstable.values()) == 0


# --------------------------------------------------------------------------------------------------
# memory cap, batch norm modes, floating point


def test_memory_cap_chunks_give_the_same_bounds():
    model, x = cnn(), inputs((2, 10, 10), n=3)
    C = bounds.margin_spec(torch.tensor([0, 1, 3]), 4, torch.float64)
    for method in ("crown-ibp", "crown"):
        ref = bounds.compute_bounds(model, x, 0.05, method, C)
        for cap in (1, 20_000, 200_000):  # one row at a time, spec chunks, batch chunks
            got = bounds.compute_bounds(model, x, 0.05, method, C, max_memory=cap)
            assert torch.allclose(got[0], ref[0], atol=1e-12)
            assert torch.allclose(got[1], ref[1], atol=1e-12)


def test_chunk_sizes_respect_the_cap():
    assert bounds.crown.chunk_sizes(4, 9, 100, 4, 1 << 30) == (4, 9)
    b, s = bounds.crown.chunk_sizes(128, 8192, 32768, 4, 1 << 30)
    assert b == 1 and s * 32768 * 4 * bounds.crown.LIVE_COPIES <= 1 << 30
    assert bounds.crown.chunk_sizes(2, 3, 10**9, 4, 1) == (1, 1)


def test_train_mode_batch_norm_uses_clean_batch_statistics():
    model, frozen, x = cnn(), cnn(), inputs((2, 10, 10), n=5)
    model.train()
    before = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    lower, upper = bounds.compute_bounds(model, x, 0.03, "crown-ibp")
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # running stats untouched
    # Freeze the clean batch statistics into running statistics: eval mode must then agree.
    bn = frozen[2]
    h = frozen[1](frozen[0](x))
    bn.running_mean = h.mean((0, 2, 3))
    bn.running_var = h.var((0, 2, 3), unbiased=False)
    ref_lower, ref_upper = bounds.compute_bounds(frozen, x, 0.03, "crown-ibp")
    assert torch.allclose(lower, ref_lower, atol=1e-10)
    assert torch.allclose(upper, ref_upper, atol=1e-10)
    # And the residual network, IBP in train mode, is sound for the frozen-statistics network.
    res = resnet().train()
    xr = inputs((1, 8, 8), n=4)
    lo, up = bounds.compute_bounds(res, xr, 0.02, "ibp", differentiable=True)
    assert lo.requires_grad
    assert torch.isfinite(lo).all() and (lo <= up).all()


def test_bounds_are_differentiable_only_when_asked():
    model = models.digits_cnn()
    x = torch.rand(3, 1, 8, 8)
    C = bounds.margin_spec(torch.tensor([1, 2, 3]), 10)
    for method in METHODS:
        lower, _ = bounds.compute_bounds(model, x, 0.02, method, C, upper=False,
                                         differentiable=True)
        model.zero_grad()
        lower.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        # Grad mode on and parameters that require grad: still nothing recorded by default.
        assert not bounds.compute_bounds(model, x, 0.02, method, C, upper=False)[0].requires_grad


def test_exact_float_restores_precision_flags():
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with bounds.exact_float():
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert not torch.is_autocast_enabled("cpu")
    assert (torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == saved
    model, x = models.digits_mlp(), torch.rand(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lower, _ = bounds.compute_bounds(model, x, 0.01, "crown")
    assert lower.dtype == torch.float32
    assert torch.equal(lower, bounds.compute_bounds(model, x, 0.01, "crown")[0])


# --------------------------------------------------------------------------------------------------
# the bound steps against autograd and brute force


def test_backward_steps_are_transposes():
    torch.manual_seed(6)
    A = torch.randn(2, 3, 5, 4, 4, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    mask = (torch.rand_like(w) > 0.5).double()
    h = torch.randn(2, 6, 8, 7, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(h, w * mask, b, stride=2, padding=1)
    assert y.shape[-2:] == (4, 4)
    A_in, bias = bound_steps.backward_conv2d(A, w, b, mask, (6, 8, 7), stride=2, padding=1)
    # A . conv(h) = A_in . h + bias, for any h
    lhs = (A * y.unsqueeze(1)).flatten(2).sum(-1)
    rhs = (A_in * h.unsqueeze(1)).flatten(2).sum(-1) + bias
    assert torch.allclose(lhs, rhs)
    # Dilation, groups and a stride that drops input rows and columns.
    w2 = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    y2 = F.conv2d(h, w2, None, stride=3, padding=(1, 0), dilation=2, groups=2)
    A3 = torch.randn(2, 3, *y2.shape[1:], dtype=torch.float64)
    A_in2, none = bound_steps.backward_conv2d(A3, w2, None, None, (6, 8, 7), stride=3,
                                              padding=(1, 0), dilation=2, groups=2)
    assert none is None
    assert torch.allclose((A3 * y2.unsqueeze(1)).flatten(2).sum(-1),
                          (A_in2 * h.unsqueeze(1)).flatten(2).sum(-1))
    A2 = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64)
    z = F.avg_pool2d(h, 3, 2, 1, True, False)
    P, _ = bound_steps.backward_avg_pool2d(A2, (6, 8, 7), 3, 2, 1, True, False, None)
    assert torch.allclose((A2 * z.unsqueeze(1)).flatten(2).sum(-1),
                          (P * h.unsqueeze(1)).flatten(2).sum(-1))


def test_relu_relaxation_encloses_relu():
    lower = torch.tensor([-2.0, -1.0, 0.5, -3.0, -1.0, 0.0])
    upper = torch.tensor([1.0, 3.0, 2.0, -0.5, 1.0, 0.0])
    us, ui, ls = reference.relu_relaxation(lower, upper)
    assert torch.equal(ls, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0]))
    t = torch.linspace(0, 1, 101).unsqueeze(1)
    z = lower + t * (upper - lower)
    assert (ls * z <= torch.relu(z) + 1e-7).all() and (torch.relu(z) <= us * z + ui + 1e-6).all()


def test_backward_relu_is_sound_and_attained():
    """Sampled soundness cannot see a slightly too small intercept; exactness at a vertex can."""
    torch.manual_seed(8)
    f64 = torch.float64
    lower = torch.randn(3, 40, dtype=f64)
    upper = lower + 2 * torch.rand(3, 40, dtype=f64)
    A = torch.randn(3, 4, 40, dtype=f64)
    Al, bl, Au, bu = bound_steps.backward_relu(A, A, lower, upper)
    z = lower[:, None] + torch.rand(3, 500, 40, dtype=f64) * (upper - lower)[:, None]
    exact = torch.einsum("bsn,bpn->bsp", A, torch.relu(z))
    assert (torch.einsum("bsn,bpn->bsp", Al, z) + bl[..., None] <= exact + 1e-12).all()
    assert (torch.einsum("bsn,bpn->bsp", Au, z) + bu[..., None] >= exact - 1e-12).all()
    # Each neuron's relaxation touches ReLU at an end of its interval: the chord at both ends, the
    # lower line at the upper end (slope 1) or the lower end (slope 0).
    _, _, lower_slope = (t.unsqueeze(1) for t in reference.relu_relaxation(lower, upper))
    lo, up = lower.unsqueeze(1), upper.unsqueeze(1)
    line_touch = torch.where(lower_slope == 1, up, lo)
    for A_side, bias, pos_end, neg_end in ((Al, bl, line_touch, lo), (Au, bu, lo, line_touch)):
        z_star = torch.where(A > 0, pos_end, neg_end)
        assert torch.allclose((A * torch.relu(z_star)).sum(-1), (A_side * z_star).sum(-1) + bias)
    assert bound_steps.backward_relu(None, A, lower, upper)[:2] == (None, None)


# --------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_raise_clear_errors():
    model, x = models.digits_mlp(), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bounds.compute_bounds(model, x, -0.1, "ibp")
    # The engine leaves the values to the input box's kernel; its error still names them.
    for method in bounds.METHODS:
        with pytest.raises(ValueError, match=r"x must lie in \[0, 1\], got values in \[1"):
            bounds.compute_bounds(model, x + 1, 0.1, method)
        with pytest.raises(ValueError, match=r"x must lie in \[0, 1\], got values in \[nan"):
            bounds.compute_bounds(model, x * float("nan"), 0.1, method)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\], got values in \[-0\.9"):
        bounds.training_bounds(model, x - 1, 0.1, bounds.margin_spec(torch.zeros(2).long(), 10))
    with pytest.raises(ValueError, match="method must be one of"):
        bounds.compute_bounds(model, x, 0.1, "alpha-crown")
    for C in (torch.zeros(2, 9, 11), torch.zeros(3, 9, 10), torch.zeros(9), torch.zeros(2, 0, 10)):
        with pytest.raises(ValueError, match="C must"):
            bounds.compute_bounds(model, x, 0.1, "crown", C)
    with pytest.raises(ValueError, match="eps must be a number or broadcast"):
        bounds.compute_bounds(model, x, torch.ones(3), "ibp")
    with pytest.raises(ValueError, match="max_memory"):
        bounds.compute_bounds(model, x, 0.1, "crown", max_memory=0)
    with pytest.raises(TypeError, match=r"unsupported layer 1 \(Sigmoid\)"):
        bounds.compute_bounds(nn.Sequential(nn.Flatten(), nn.Sigmoid()), x, 0.1, "ibp")
    with pytest.raises(TypeError, match=r"unsupported layer .*Tanh"):
        bounds.compute_bounds(nn.Tanh(), x, 0.1, "ibp")
    with pytest.raises(ValueError, match="y must"):
        bounds.verified_accuracy(model, x, torch.tensor([1]), 0.1)
    with pytest.raises(ValueError, match="y must lie in"):
        bounds.margin_spec(torch.tensor([10]), 10)


# --------------------------------------------------------------------------------------------------
# optional: agreement with auto_LiRPA


@pytest.mark.parametrize("method", METHODS)
def test_matches_auto_lirpa(method):
    auto_lirpa = pytest.importorskip("auto_LiRPA")
    from auto_LiRPA.perturbations import PerturbationLpNorm
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10)).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    eps = 0.05
    C = bounds.margin_spec(y, 10)
    bounded = auto_lirpa.BoundedModule(copy.deepcopy(model), torch.zeros_like(x))
    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1),
                             x_U=(x + eps).clamp(0, 1))
    theirs, _ = bounded.compute_bounds(x=(auto_lirpa.BoundedTensor(x, ptb),), C=C,
                                       method={"ibp": "IBP", "crown-ibp": "CROWN-IBP",
                                               "crown": "CROWN"}[method], bound_upper=False)
    # auto_LiRPA may or may not intersect CROWN's intermediate bounds with IBP's: accept either.
    ours = [bounds.compute_bounds(model, x, eps, method, C, upper=False, intersect_ibp=flag)[0]
            for flag in ((False, True) if method == "crown" else (False,))]
    assert any(torch.allclose(o, theirs, atol=1e-4, rtol=1e-4) for o in ours)
