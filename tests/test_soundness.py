"""No false certificate: the bound engine bounds what model(x) computes (or refuses), its bounds
hold in floating point, non-finite values never certify, and randomly drawn models (masked and
unmasked, every supported layer, large and tiny weights) have no certified point that PGD or
the model's own forward at points of the ball can break."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

from robprune_fast import bounds, models, objectives, ops
from robprune_fast.modes import eval_mode
from tests.helpers.bound_models import ball_samples


# --------------------------------------------------------------------------------------------------
# the engine reads exactly what model(x) computes, or refuses


class SubnetLinear(nn.Linear):
    """HYDRA's score layers: a Linear whose own forward applies a mask buffer."""

    def forward(self, x):
        return F.linear(x, self.weight * self.subnet, self.bias)


def _subnet_model():
    layer = SubnetLinear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0., 0.], [5., -5.]]))
        layer.bias.copy_(torch.tensor([3., 0.]))
    layer.register_buffer("subnet", torch.tensor([[1., 1.], [1., 0.]]))
    return nn.Sequential(layer).eval()


def test_a_subclass_with_its_own_forward_is_refused():
    model = _subnet_model()
    x, y = torch.tensor([[.5, .5]]), torch.tensor([0])
    assert model(torch.tensor([[.7, .5]])).argmax(1).item() == 1  # class 1 inside the ball
    for method in bounds.METHODS:
        with pytest.raises(TypeError, match="SubnetLinear overrides Linear.forward"):
            bounds.verified_accuracy(model, x, y, 0.2, method)


class SequentialWithSkip(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + x


@pytest.mark.parametrize("tamper", ["forward_hook", "pre_hook", "instance_forward",
                                    "sequential_subclass", "old_weight_norm", "global_hook"])
def test_hooks_and_overridden_forwards_are_refused(tamper):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    handles = []
    if tamper == "forward_hook":
        handles.append(model[1].register_forward_hook(lambda m, i, o: o * 2))
    elif tamper == "pre_hook":
        handles.append(model[3].register_forward_pre_hook(lambda m, i: (i[0] + 1,)))
    elif tamper == "instance_forward":
        model[3].forward = lambda x: F.linear(x, 2 * model[3].weight, model[3].bias)
    elif tamper == "sequential_subclass":
        model = SequentialWithSkip(nn.Flatten(), nn.Linear(4, 4))
    elif tamper == "old_weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[1])
    elif tamper == "global_hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o))
    try:
        with pytest.raises(TypeError, match="unsupported|global forward hooks"):
            bounds.compute_bounds(model, torch.rand(2, 1, 2, 2), 0.1, "ibp")
    finally:
        for h in handles:
            h.remove()


def test_a_mask_buffer_the_forward_ignores_is_ignored():
    """A stock Linear with a weight_mask buffer but no pruning hook computes the dense layer;
    so do the bounds. torch.nn.utils.prune's hook, which applies the mask, is read exactly."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    decoy = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    decoy.load_state_dict(dense.state_dict())
    decoy[0].register_buffer("weight_mask", torch.zeros(5, 6, dtype=torch.float64))
    pruned = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    pruned.load_state_dict(dense.state_dict())
    prune.random_unstructured(pruned[0], "weight", amount=0.5)
    prune.l1_unstructured(pruned[2], "bias", amount=1)  # a pruned bias too
    stripped = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    stripped.load_state_dict({k.replace("_orig", ""): v for k, v in pruned.state_dict().items()
                              if not k.endswith("_mask")})
    with torch.no_grad():
        stripped[0].weight.mul_(pruned[0].weight_mask)
        stripped[2].bias.mul_(pruned[2].bias_mask)
    x = torch.rand(3, 6, dtype=torch.float64)
    for method in bounds.METHODS:
        for a, b in ((decoy, dense), (pruned, stripped)):
            for got, want in zip(bounds.compute_bounds(a, x, 0.1, method),
                                 bounds.compute_bounds(b, x, 0.1, method)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_parametrized_weights_are_read_through_their_parametrization():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(3.0)  # g: the forward changes
    x = torch.rand(4, 6, dtype=torch.float64)
    for method in bounds.METHODS:
        lower, upper = bounds.compute_bounds(model, x, 0.0, method)
        torch.testing.assert_close(lower, model(x), rtol=0, atol=1e-9)
        torch.testing.assert_close(upper, model(x), rtol=0, atol=1e-9)


WIDENING_BOXES = {  # (centre, radius) of 300 inputs, drawn from a seeded generator
    # stable and unstable neurons alike
    "wide": lambda g: (torch.randn(2, 300, generator=g), torch.rand(2, 300, generator=g) * 1.5),
    # |centre| >> radius, as at small eps
    "narrow": lambda g: (torch.randn(2, 300, generator=g), torch.rand(2, 300, generator=g) / 100),
    # every neuron straddles 0: under a pending ReLU every lower end is clamped
    "unstable": lambda g: (torch.randn(2, 300, generator=g) / 100, torch.ones(2, 300)),
    # all negative: the magnitude an op reads is |centre| + radius, not relu(centre + radius)
    "negative": lambda g: (-0.5 - torch.rand(2, 300, generator=g), torch.full((2, 300), 0.01)),
    # active, but the lower end close to 0: the widening must be read from the upper end
    "barely_active": lambda g: (lambda r: (r * (1.05 + torch.rand(2, 300, generator=g) / 2), r))(
        0.5 + torch.rand(2, 300, generator=g) / 2),
}


@pytest.mark.parametrize("grad", [False, True], ids=["in_place", "autograd"])
@pytest.mark.parametrize("relu_pending", [False, True], ids=["signed_input", "pending_relu"])
@pytest.mark.parametrize("bias", [1e4, 1.0, None], ids=["large_bias", "bias", "no_bias"])
@pytest.mark.parametrize("box", sorted(WIDENING_BOXES))
def test_widening_covers_what_its_proof_needs(box, bias, relu_pending, grad):
    """Sound IBP's widening checked against its own requirement, not by sampling (rounding that
    bad is too rare to sample): the widened float32 box of a layer must hold the exact output box
    of the unwidened input and, around it, the float forward's worst error gamma_n (|W| u + |b|)
    at any input of the box. Computed in float64 from the float32 operands, per output."""
    from robprune_fast.bounds import affine, rounding
    g = torch.Generator().manual_seed(3)
    c, r = WIDENING_BOXES[box](g)
    n_in, n_out = c.shape[1], 40
    w = torch.randn(n_out, n_in, generator=g) * 4
    w[: n_out // 2] = w[: n_out // 2].abs()  # all-positive rows: a clamped lower end gets no help
    b = None if bias is None else torch.randn(n_out, generator=g) * bias  # 1e4: it dominates the error
    op = affine.Linear("layer", w, b, None, torch.float32)
    op.out_shape = (n_out,)
    widen = rounding.Widening(torch.float32, torch.float32)
    with torch.set_grad_enabled(grad):
        r_in = widen.before(op, c, r, relu_pending)
        centre, radius = op.ibp(c, r_in, relu_in=relu_pending)
        radius = widen.after(op, radius.clone())
    # The requirement, per end and for any rounding (not only this run's): the box must hold
    # the exact outputs of the unwidened input box and the float forward's at any of its points
    # z, off by at most gam (|W| |z| + |b|); per neuron the extreme of w z -+ gam |w| |z| over
    # [z_lo, z_hi] lies at an end (|z| is convex). And the computed centre may be off by up to
    # gam (|W| |centre read| + |b|), the radius rounded down by up to gam |W| (radius read), what
    # is read being the widened input box (after the pending ReLU).
    w64, b64 = w.double(), torch.zeros(n_out, dtype=torch.float64) if b is None else b.double()
    gam = rounding.gamma(n_in + 1, torch.float32)

    def ends(centre_in, radius_in):
        lo, hi = centre_in - radius_in, centre_in + radius_in
        return (lo.relu(), hi.relu()) if relu_pending else (lo, hi)

    z_lo, z_hi = (z.unsqueeze(1) for z in ends(c.double(), r.double()))  # (B, 1, n_in)
    at = lambda z, sign: w64 * z + sign * gam * w64.abs() * z.abs()  # (B, n_out, n_in)
    need_lo = torch.minimum(at(z_lo, -1), at(z_hi, -1)).sum(-1) + b64 - gam * b64.abs()
    need_hi = torch.maximum(at(z_lo, 1), at(z_hi, 1)).sum(-1) + b64 + gam * b64.abs()
    read_lo, read_hi = ends(c.double(), r_in.detach().double())
    c_read, r_read = (read_hi + read_lo) / 2, (read_hi - read_lo) / 2
    centre_error = gam * (c_read.abs() @ w64.abs().T + b64.abs())
    radius_error = gam * (1 + 3 * gam) * (r_read @ w64.abs().T)
    lower = centre.double() - radius.double() + radius_error + centre_error
    upper = centre.double() + radius.double() - radius_error - centre_error
    assert (lower <= need_lo).all() and (upper >= need_hi).all()
    exact_radius = (z_hi - z_lo).squeeze(1) / 2 @ w64.abs().T
    assert (radius.double() <= exact_radius * 1.01 + 1e-3 * b64.abs() + 1).all()  # not absurdly wide


@pytest.mark.parametrize("relu_pending", [False, True], ids=["signed_input", "pending_relu"])
@pytest.mark.parametrize("bias", [1e4, 1.0, None], ids=["large_bias", "bias", "no_bias"])
@pytest.mark.parametrize("box", sorted(WIDENING_BOXES))
def test_widened_specification_covers_what_its_proof_needs(box, bias, relu_pending):
    """The last layer with a specification C folded in (a margin's two logits), sound IBP:
    its bounds must hold the exact C (W z + b) over the unwidened box and C times the float
    forward's logits, each off by up to gam (|W| u + |b|) (u >= |z| over the box), for any
    rounding of the bounds' own computation: the centre C (W c + b) off by up to
    gam |C| (|W| |c| + |b|), the radius |C W| r rounded down by up to gam |C| |W| r."""
    from robprune_fast.bounds import affine, ibp, rounding
    g = torch.Generator().manual_seed(6)
    c, r = WIDENING_BOXES[box](g)
    n_in, k = c.shape[1], 10
    w = torch.randn(k, n_in, generator=g) * 4
    w[: k // 2] = w[: k // 2].abs()
    b = None if bias is None else torch.randn(k, generator=g) * bias
    last = affine.Linear("last", w, b, None, torch.float32)
    C = torch.zeros(2, k - 1, k)  # margins of class 3: logit 3 minus each other logit
    others = [j for j in range(k) if j != 3]
    C[:, :, 3] = 1
    C[:, torch.arange(k - 1), others] = -1
    widen = rounding.Widening(torch.float32, torch.float32)
    centre, radius = ibp.spec_bounds(last, c, r, C, relu_in=relu_pending)
    radius = ibp._widen_spec(widen, last, c, r, C, relu_pending, radius)
    c64, r64 = c.double(), r.double()
    if relu_pending:
        lo, hi = torch.relu(c64 - r64), torch.relu(c64 + r64)
        c64, r64 = (hi + lo) / 2, (hi - lo) / 2
    w64 = w.double()
    b64 = torch.zeros(k, dtype=torch.float64) if b is None else b.double()
    gam = rounding.gamma(n_in + 1, torch.float32)
    C64, folded = C.double(), C.double() @ w64
    exact_centre = (C64 @ (c64 @ w64.T + b64).unsqueeze(-1)).squeeze(-1)
    exact_radius = (folded.abs() @ r64.unsqueeze(-1)).squeeze(-1)
    per_logit = lambda v: (C64.abs() @ (v @ w64.abs().T + b64.abs()).unsqueeze(-1)).squeeze(-1)
    forward_error = gam * per_logit(c64.abs() + r64)
    centre_error = 2 * gam * per_logit(c64.abs())  # the logits' sums, then C's (k terms)
    radius_error = 2 * gam * (C64.abs() @ (r64 @ w64.abs().T).unsqueeze(-1)).squeeze(-1)
    slack = radius.double() - radius_error - centre_error - forward_error
    assert (centre.double() - slack <= exact_centre - exact_radius).all()
    assert (centre.double() + slack >= exact_centre + exact_radius).all()


def _wiring_model():
    """Every kind of op the walk treats apart: fused ReLUs, a ReLU before ops that cannot take
    it (batch norm, pooling), one that passes through (flatten), ReLU after ReLU, a residual
    block."""
    torch.manual_seed(0)
    return nn.Sequential(
        models.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.ReLU(),
        models.PreActBlock(8, 8, 1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3),
    ).eval()


@pytest.mark.parametrize("grad", [False, True], ids=["in_place", "autograd"])
def test_the_walk_widens_every_op_by_what_it_reads(monkeypatch, grad):
    """Sound IBP's wiring: before every op that rounds (residual blocks' included) the walk
    widens by what that op reads: after a pending ReLU exactly when the op takes it as its
    relu_in prologue, else the signed box itself."""
    from robprune_fast.bounds import rounding
    widened, calls = [], []
    before = rounding.Widening.before

    def spy_before(self, op, c, r, relu_pending):
        widened.append((op, relu_pending))
        return before(self, op, c, r, relu_pending)
    monkeypatch.setattr(rounding.Widening, "before", spy_before)
    for cls in {type(op) for op in _all_ops()}:
        if "ibp" in cls.__dict__:
            original = cls.__dict__["ibp"]

            def spy_ibp(self, c, r, relu_in=False, original=original):
                if not calls or calls[-1][0] is not self:  # batch norm calls its base's ibp
                    calls.append((self, relu_in))
                return original(self, c, r, relu_in)
            monkeypatch.setattr(cls, "ibp", spy_ibp)
    model = _wiring_model()
    x = torch.rand(2, 3, 8, 8)
    with torch.set_grad_enabled(grad):
        bounds.compute_bounds(model, x, 0.01, "ibp", differentiable=grad)
    rounding_ops = [(op, relu_in) for op, relu_in in calls if op.terms]
    assert len(rounding_ops) == 11  # the input normalisation is folded into the input box
    assert [(op, pending) for op, pending in widened if op.terms] == rounding_ops
    assert any(relu_in for _, relu_in in widened) and not all(relu_in for _, relu_in in widened)


def _all_ops():
    from robprune_fast.bounds import compile as compile_ops, layers
    seq = compile_ops.compile_model(_wiring_model(), torch.float32)
    return list(seq) + [op for o in seq if isinstance(o, layers.Residual) for op in o.children()]


def test_an_in_place_walk_takes_boxes_of_different_layouts():
    """Without autograd IBP maps ReLU boxes in place; a centre and radius laid out differently
    (a channels-last centre, a contiguous radius) take the out-of-place ReLU and give the same
    box."""
    from robprune_fast.bounds import compile as compile_ops, ibp
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    seq = compile_ops.compile_model(model, torch.float32)
    g = torch.Generator().manual_seed(7)
    c = torch.randn(2, 3, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.rand(2, 3, 4, 4, generator=g)
    with torch.no_grad():
        expected = ibp.walk(seq, c.clone(), r.clone())
        got = ibp.walk(seq, c.clone(memory_format=torch.channels_last), r.clone(), in_place=True)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


BUDGET_BOXES = dict(WIDENING_BOXES,
    # one end of every box within a few budgets of 0: the stable/unstable tests decide here
    edges=lambda g: (lambda r, s, d: (s * r + d, r))(
        torch.rand(2, 300, generator=g), torch.randint(0, 2, (2, 300), generator=g) * 2.0 - 1,
        torch.randn(2, 300, generator=g) * 0.03))


def _budget_in(g, like):
    """A budget already carried by earlier layers: up to 0.02, of the order of the edges."""
    return torch.rand(like.shape, generator=g) * 0.02


@pytest.mark.parametrize("crown", [False, True], ids=["ibp_only", "crown"])
@pytest.mark.parametrize("box", sorted(BUDGET_BOXES))
def test_budget_covers_what_its_proof_needs(box, crown):
    """The CROWN methods' rounding budget T (rounding.Budget) checked against what its proof
    needs, per neuron, in float64 (rounding that bad is too rare to sample):
    - at the input, T bounds the rounding of the box of the clipped ball: >= 2 u max|x'|;
    - through a linear layer (whose magnitude h is read from the budget, >= |c| + r), T grows
      to at least |W| T + gamma (|W| h + |b|), gamma of the sums it covers: fan-in (+ bias) for
      the forward and IBP, and with CROWN fan-out for A W and every output for A b;
    - through a ReLU, the slack of its pre-activation bounds is >= 2 T (the computation's T and
      the forward's); T may stop only where c + r + 2 T <= 0 (0 in the exact network and the
      float forward alike), an unstable neuron adds its relaxation's rounding (>= gamma_4 h),
      and the next op's magnitude is >= relu(c + r + 2 T);
    - a specification C's slack is >= 2 |C| T."""
    from robprune_fast.bounds import affine, layers, rounding
    g = torch.Generator().manual_seed(5)
    u = rounding.unit_roundoff(torch.float32)
    gam = lambda n: rounding.gamma(n, torch.float32)
    # the input: points near 0 with eps larger than them, near 1 with the ball clipped
    x = torch.rand(2, 300, generator=g) * torch.tensor([0.01, 1.0]).repeat(150)
    eps = torch.tensor([[0.05], [0.3]])
    budget = rounding.Budget(x, eps, torch.float32, crown=crown)
    assert (budget.T.double() >= 2 * u * (x + eps).clamp(max=1).double()).all()
    assert budget.gamma(10) >= gam(10)
    # a linear layer
    c, r = BUDGET_BOXES[box](g)
    n_in, n_out = c.shape[1], 40
    w = torch.randn(n_out, n_in, generator=g) * 4
    b = torch.randn(n_out, generator=g) * 100
    op = affine.Linear("layer", w, b, None, torch.float32)
    op.out_shape = (n_out,)
    budget.T = T = _budget_in(g, c)
    h = budget.magnitude(c, r)
    h64 = c.double().abs() + r.double()
    assert (h.double() >= h64 * (1 - u)).all()  # its own rounding is second order
    T_out = op.rounding(T, h, budget).double()
    aw, ab = w.double().abs(), b.double().abs()
    g_w = gam(max(n_in, n_out) + 1 if crown else n_in + 1)
    g_b = gam(n_out + 1 if crown else 2)
    need = (T.double() + g_w * h64) @ aw.T + g_b * ab
    assert (T_out >= need).all()
    assert (T_out <= 2 * need + 1e-3).all()  # not absurdly wide
    # a ReLU
    budget.T = T = _budget_in(g, c)
    relu = layers.ReLU("relu")
    budget.through_relu(relu, c, r)
    c64, r64, T64 = c.double(), r.double(), T.double()
    assert (relu.slack.double() >= 2 * T64).all()
    live = c64 + r64 + 2 * T64 > 0
    unstable = live & (c64 - r64 - 2 * T64 < 0)
    T_out = budget.T.double()
    assert (T_out[live] >= T64[live]).all()
    assert (T_out[unstable] >= T64[unstable] + gam(4) * h64[unstable]).all()
    assert (T_out[c64 + r64 + 4 * T64 < 0] == 0).all()  # and it does stop
    assert (budget.magnitude(c, r).double() >= torch.relu(c64 + r64 + 2 * T64) * (1 - u)).all()
    # a specification's slack
    C = torch.randn(2, 9, 300, generator=g)
    need = 2 * (C.double().abs() @ budget.T.double().unsqueeze(-1)).squeeze(-1)
    assert (budget.slack(C).double() >= need).all()
    assert (budget.slack().double() >= 2 * budget.T.double()).all()


def test_widening_of_sums_and_of_the_last_bounds():
    """A sum of two boxes (a residual block's) is off by one rounding in its centre, its radius
    and the forward's sum: its widened radius must exceed r + 2 u (|c| + r); the last bounds
    move outward, never inward."""
    from robprune_fast.bounds import rounding
    widen = rounding.Widening(torch.float32, torch.float32)
    g = torch.Generator().manual_seed(4)
    c = torch.randn(1000, generator=g) * 10
    r = torch.rand(1000, generator=g) * torch.tensor([0.01, 100.0]).repeat(500)
    u = rounding.unit_roundoff(torch.float32)
    need = r.double() + 2 * u * (c.double().abs() + r.double())
    assert (widen.around_sum(c, r).double() >= need).all()
    lower, upper = c - r, c + r
    out_lower, out_upper = widen.outward(lower, upper)
    assert (out_lower < lower).all() and (out_upper > upper).all()


def test_verification_runs_the_model_in_its_own_dtype():
    """A float64 model verified on float32 points: its own forward (which decides `correct`)
    runs in float64, as the model would be used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double().eval()
    x = torch.rand(5, 4)
    with torch.no_grad():
        y = model(x.double()).argmax(1)
    v = bounds.verified_accuracy(model, x, y, 0.001, "ibp")
    assert v.correct.all()


def test_verification_in_float64_and_in_batches_of_one():
    """dtype=torch.float64 verifies float32 points in float64 (as float64 points are), and the
    batch size changes nothing, down to batches of one point."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(6, 3, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    want = bounds.verified_accuracy(model.double(), x.double(), y, 0.02, "crown-ibp")
    got = bounds.verified_accuracy(model, x, y, 0.02, "crown-ibp", dtype=torch.float64)
    assert got.margin_lower.dtype == torch.float64
    torch.testing.assert_close(got.margin_lower, want.margin_lower, rtol=0, atol=1e-12)
    model.float()
    whole = bounds.verified_accuracy(model, x, y, 0.02, "ibp")
    ones = bounds.verified_accuracy(model, x, y, 0.02, "ibp", batch_size=1)
    assert torch.equal(whole.verified, ones.verified) and whole.unstable == ones.unstable
    torch.testing.assert_close(ones.margin_lower, whole.margin_lower, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["x", "y"])
def test_verification_refuses_points_that_are_not_tensors(which):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    args = {"x": (x.tolist(), y), "y": (x, y.tolist())}[which]
    with pytest.raises(ValueError, match=f"^{which} must"):
        bounds.verified_accuracy(model, *args, 0.01, "ibp")


def test_verification_takes_correct_from_the_model_and_cross_checks_it(monkeypatch):
    """correct comes from model(x); a model the engine reads wrongly (here: a monkeypatched
    class method, which the engine cannot see on the instance) is caught by the cross-check."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.rand(5, 1, 2, 2)
    y = model(x).argmax(1)
    assert bounds.verified_accuracy(model, x, y, 0.0, "ibp").correct.all()
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, h: torch.tanh(h))
    with pytest.raises((RuntimeError, TypeError), match="disagrees|overrides"):
        bounds.verified_accuracy(model, x, y, 0.0, "ibp")


def test_a_masked_last_layer_decides_the_clean_prediction():
    """Pruning the last layer flips some predictions; correct follows the pruned network."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(64, 5)
    unmasked = model(x).argmax(1)
    prune.random_unstructured(model[2], "weight", amount=0.6)
    masked = model(x).argmax(1)
    assert (masked != unmasked).any()
    v = bounds.verified_accuracy(model, x, unmasked, 0.0, "crown-ibp")
    assert torch.equal(v.correct, masked == unmasked)


# --------------------------------------------------------------------------------------------------
# rounding


def _large_logits_model(seed):
    """The hostile probe's model: logits around 1000-2000, margin lower bound -1e-4 in exact
    arithmetic over the ball (x' = 0 is in it and gives class 1)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(256, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = torch.rand(256, generator=g) * 30
        lin.bias.copy_(torch.tensor([-1e-4, 0.]))
    x = torch.rand(1, 256, generator=g) * .5 + .25
    return nn.Sequential(lin).eval(), x


@pytest.mark.parametrize("method", bounds.METHODS)
def test_rounding_never_certifies_a_negative_margin(method):
    for seed in range(200 if method == "ibp" else 40):
        model, x = _large_logits_model(seed)
        v = bounds.verified_accuracy(model, x, torch.tensor([0]), x.clone(), method)
        assert not v.verified.any(), seed
        assert model(torch.zeros_like(x)).argmax(1).item() == 1


def test_a_margin_within_rounding_of_zero_is_not_certified():
    """Logits of 1e4 and a true margin of 1e-3 everywhere in the ball: float32 rounding of the
    forward can exceed the margin, so a sound engine must not certify (an engine that ignored
    rounding, or subtracted its tolerance with the wrong sign, would); a margin of 10 is."""
    lin = nn.Linear(64, 2)
    with torch.no_grad():
        lin.weight.fill_(1e4 / 32)
        lin.weight[1] = lin.weight[0]
        lin.bias.copy_(torch.tensor([1e-3, 0.]))
    model = nn.Sequential(lin).eval()
    x = torch.full((1, 64), 0.5)
    for method in bounds.METHODS:
        v = bounds.verified_accuracy(model, x, torch.tensor([0]), 0.01, method)
        assert v.correct.all() and not v.verified.any(), method
        with torch.no_grad():
            lin.bias[0] = 10.0
        assert bounds.verified_accuracy(model, x, torch.tensor([0]), 0.01, method).verified.all()
        with torch.no_grad():
            lin.bias[0] = 1e-3


def test_float32_bounds_hold_for_the_float32_forward_with_large_weights():
    """Every output of the float32 forward at points of the ball lies in the float32 bounds,
    with no tolerance, for weights scaled to 1e3 per layer (logits around 1e9)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e3)
    x = torch.rand(3, 3, 4, 4)
    for method in bounds.METHODS:
        lower, upper = bounds.compute_bounds(model, x, 1e-3, method)
        with torch.no_grad():
            for point in ball_samples(x, 1e-3, 64):
                out = model(point)
                assert (out >= lower).all() and (out <= upper).all(), method


def test_non_finite_intermediates_never_certify():
    """A pre-activation interval [-2e38, 2e38]: u - l overflows in float32, and a chord slope
    of u / inf = 0 would drop the neuron (as if inactive) and certify a point that x = (1, 0)
    breaks (margin 1 - 1e-37 * 2e38 = -19). The bound must stay non-certifying."""
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2e38, -2e38]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1e-37], [0.]]))
        model[2].bias.copy_(torch.tensor([1., 0.]))
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    assert model(torch.tensor([[1., 0.]])).argmax(1).item() == 1
    for method in bounds.METHODS:
        v = bounds.verified_accuracy(model, x, y, 0.5, method)
        assert v.correct.all() and not v.verified.any(), method


# --------------------------------------------------------------------------------------------------
# modes, memory, clear errors


def test_verification_keeps_a_frozen_batch_norm_frozen():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # frozen statistics while the rest trains
    x = torch.rand(8, 4)
    bounds.verified_accuracy(model, x, torch.zeros(8, dtype=torch.long), 0.01, "ibp")
    assert model.training and model[0].training and not model[1].training
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[1].training


def test_nothing_is_recorded_for_autograd_unless_asked():
    model = models.digits_cnn()
    x = torch.rand(8, 1, 8, 8)
    for method in bounds.METHODS:
        lower, upper = bounds.compute_bounds(model, x, 0.05, method)
        assert not lower.requires_grad and not upper.requires_grad
    with pytest.raises(ValueError, match="would keep about .* GiB for the backward pass"):
        bounds.compute_bounds(model, x, 0.05, "crown", max_memory=1 << 16, differentiable=True)
    # The working-set cap alone is honoured by chunking.
    capped = bounds.compute_bounds(model, x, 0.05, "crown", max_memory=1 << 16)
    torch.testing.assert_close(capped[0], bounds.compute_bounds(model, x, 0.05, "crown")[0])


def test_intersected_crown_bounds_never_cross():
    """At tiny and zero eps, CROWN's and IBP's sound bounds both hold, so their intersection
    never has lower > upper, for any random network."""
    for seed in range(40):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                              nn.Linear(10, 4))
        x = torch.rand(3, 6)
        for eps in (0.0, 1e-8):
            lower, upper = bounds.compute_bounds(model, x, eps, "crown", intersect_ibp=True)
            assert (lower <= upper).all(), (seed, eps)


def test_degenerate_inputs_give_clear_errors_or_exact_answers():
    model = models.digits_mlp()
    with pytest.raises(ValueError, match="x must be a tensor of shape .* N >= 1"):
        bounds.verified_accuracy(model, torch.rand(0, 1, 8, 8), torch.zeros(0).long(), 0.1)
    with pytest.raises(ValueError, match="no layers"):
        bounds.compute_bounds(nn.Sequential(), torch.rand(2, 3), 0.1, "ibp")
    with pytest.raises(ValueError, match="tol must be >= 0"):
        bounds.verified_accuracy(model, torch.rand(2, 1, 8, 8), torch.zeros(2).long(), 0.1,
                                 tol=-100)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        bounds.verified_accuracy(model, torch.rand(2, 1, 8, 8), torch.zeros(2).long(), 0.1,
                                 batch_size=0)
    # No input features: the layer is its bias, exactly.
    empty = nn.Sequential(nn.Linear(0, 3)).double()
    for method in bounds.METHODS:
        lower, upper = bounds.compute_bounds(empty, torch.rand(2, 0, dtype=torch.float64), 0.1,
                                             method)
        torch.testing.assert_close(lower, empty[0].bias.detach().expand(2, 3))
        torch.testing.assert_close(upper, empty[0].bias.detach().expand(2, 3))


def test_per_sample_eps_larger_than_a_batch():
    model = models.digits_mlp().eval()
    x = torch.rand(10, 1, 8, 8)
    y = model(x).argmax(1)
    eps = torch.linspace(0, 0.02, 10).view(10, 1, 1, 1)
    whole = bounds.verified_accuracy(model, x, y, eps, "crown-ibp", batch_size=3)
    for i in range(0, 10, 3):  # each batch with its own slice of eps
        part = bounds.verified_accuracy(model, x[i:i + 3], y[i:i + 3], eps[i:i + 3], "crown-ibp")
        assert torch.equal(whole.margin_lower[i:i + 3], part.margin_lower)


def test_relu_box_refuses_a_bad_radius_before_writing():
    center, radius = torch.randn(4, 5), torch.rand(4, 5)
    radius[2, 3] = -1.0
    before = center.clone(), radius.clone()
    with pytest.raises((RuntimeError, ValueError), match="radius must be >= 0"):
        ops.relu_box_(center, radius)
    assert torch.equal(center, before[0]) and torch.equal(radius, before[1])


# --------------------------------------------------------------------------------------------------
# tests that let bugs through before


@pytest.mark.parametrize("tail", ["relu", "batchnorm", "avgpool"])
def test_ibp_with_a_specification_on_a_model_not_ending_in_linear(tail):
    """C @ output's radius needs |C|: a model whose last layer is not Linear takes the box of
    the output times C, which sampling with negative C entries checks."""
    torch.manual_seed(7)
    layers = {"relu": [nn.Flatten(), nn.Linear(16, 6), nn.ReLU()],
              "batchnorm": [nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6)],
              "avgpool": [nn.Conv2d(1, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]}
    model = nn.Sequential(*layers[tail]).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    C = torch.randn(3, 4, 6, dtype=torch.float64)
    lower, upper = bounds.compute_bounds(model, x, 0.1, "ibp", C)
    with torch.no_grad():
        for point in ball_samples(x, 0.1, 200):
            out = (C @ model(point).unsqueeze(-1)).squeeze(-1)
            assert (out >= lower).all() and (out <= upper).all()


def test_a_mask_changed_in_place_inside_the_weight_cache_is_followed():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    prune.random_unstructured(model[1], "weight", amount=0.3)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    with ops.weight_cache():
        before = bounds.compute_bounds(model, x, 0.05, "crown-ibp")
        with torch.no_grad():
            model[1].weight_mask[:4].zero_()
            model(x)  # the pruning hook recomputes weight from the new mask
        after = bounds.compute_bounds(model, x, 0.05, "crown-ibp")
    fresh = bounds.compute_bounds(model, x, 0.05, "crown-ibp")
    assert not torch.equal(before[0], after[0])
    for got, want in zip(after, fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loss_fusion_mixes_beta_the_right_way():
    """CROWN-IBP with loss fusion at beta = 0.25: the robust loss is 0.25 * the fused bound +
    0.75 * IBP's worst-case CE (kappa 0, eps full)."""
    from robprune_fast import loss_fusion
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 4, (6,))
    obj = objectives.build("crown-ibp", eps=0.05, eps_ramp=0.0, kappa_start=0, kappa_end=0,
                           beta_start=0.25, beta_end=0.25, loss_fusion=True)
    loss, _ = obj(model, x, y, 1.0)
    fused, b = loss_fusion.fused_ce_bound(model, x, y, 0.05, 4)
    ibp_ce, _ = loss_fusion.robust_ce(b.ibp_lower, y)
    want = (0.25 * fused + 0.75 * ibp_ce).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# property test: random models, no certified point broken


def _random_model(rng: torch.Generator, scale: float, masked: bool, crown: bool):
    """A small random network of the supported layers, its weights scaled by `scale`."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    channels = pick([2, 3])
    layers = [models.Normalize((0.4,) * channels, (0.3,) * channels)]
    c, size = channels, 6
    for _ in range(pick([1, 2])):
        out = pick([3, 4])
        layers.append(nn.Conv2d(c, out, 3, stride=pick([1, 2]), padding=1))
        size = (size + 2 - 3) // layers[-1].stride[0] + 1
        if pick([True, False]):
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        if pick([True, False]) and size >= 2:
            layers.append(pick([nn.AvgPool2d(2, 1)] if crown else [nn.AvgPool2d(2, 1), nn.MaxPool2d(2, 1)]))
            size -= 1
        c = out
    layers.append(nn.Flatten())
    width = c * size * size
    for _ in range(pick([1, 2])):
        hidden = pick([5, 8])
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if pick([True, False]):
            layers.insert(-1, nn.BatchNorm1d(hidden))
        width = hidden
    layers.append(nn.Linear(width, 3))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(scale)
                m.bias.mul_(scale)
                if masked:
                    prune.random_unstructured(m, "weight", amount=0.5)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-scale, scale, generator=rng)
                m.running_var.uniform_(0.5 * scale ** 2, 2 * scale ** 2, generator=rng)
                m.weight.uniform_(-1.5, 1.5, generator=rng)
    return model.eval(), channels


def _worst_margin(model, C):
    return lambda z: (C @ model(z).unsqueeze(-1)).squeeze(-1).min(1).values


def _pgd_min(f, x, eps, steps=30, restarts=3, seed=0):
    """Points of the clipped ball that minimise f (per sample), from several random starts."""
    g = torch.Generator().manual_seed(seed)
    best, best_val = x.clone(), f(x).detach()
    for _ in range(restarts):
        xa = (x + eps * (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            (grad,) = torch.autograd.grad(f(xa).sum(), xa)
            with torch.no_grad():
                xa = torch.minimum(torch.maximum(xa - eps / 4 * grad.sign(), x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            val = f(xa)
            better = val < best_val
            best[better], best_val = xa[better], torch.minimum(best_val, val)
    return best


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_no_certified_point_of_a_random_model_is_broken(scale, masked):
    rng = torch.Generator().manual_seed(int(scale * 1000) + masked)
    certified = 0
    for trial in range(6):
        crown = trial % 2 == 0
        torch.manual_seed(trial)
        model, channels = _random_model(rng, scale, masked, crown)
        x = torch.rand(8, channels, 6, 6, generator=rng)
        with torch.no_grad():
            y = model(x).argmax(1)
        # Exactness at eps 0 first, in float64: a dropped mask or a wrong batch-norm mode
        # shows here, where sampling alone is too loose a net.
        model64, x64 = copy.deepcopy(model).double(), x.double()
        with torch.no_grad():
            out = model64(x64)
        for method in ("ibp", "crown-ibp") if crown else ("ibp",):
            lower, upper = bounds.compute_bounds(model64, x64, 0.0, method)
            assert (out >= lower).all() and (out <= upper).all()
            assert ((upper - lower) <= 1e-6 * (1 + out.abs())).all(), method
        eps = 0.02
        for method in ("ibp", "crown-ibp", "crown") if crown else ("ibp",):
            v = bounds.verified_accuracy(model, x, y, eps, method)
            if not v.verified.any():
                continue
            certified += int(v.verified.sum())
            xv, yv = x[v.verified], y[v.verified]
            C = bounds.margin_spec(yv, 3)
            with torch.no_grad():
                for point in ball_samples(xv, eps, 64, seed=trial):
                    assert (model(point).argmax(1) == yv).all(), (method, trial)
            xa = _pgd_min(_worst_margin(model, C), xv, eps)
            assert (xa - xv).abs().max() <= eps + 1e-6
            with torch.no_grad():
                assert (model(xa).argmax(1) == yv).all(), (method, trial)
    assert certified > 0  # the test must exercise certificates


def test_certified_training_notices_a_model_the_engine_reads_wrongly(monkeypatch):
    """The objective's clean pass is checked against its own IBP bounds: a layer whose forward
    changed behind the engine's back (here every ReLU, patched on the class) stops training."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 4, (6,))
    obj = objectives.build("ibp", eps=0.01, eps_ramp=0.0, kappa_start=0.5, kappa_end=0.5)
    obj(model, x, y, 1.0)  # consistent: no complaint
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, h: torch.exp(h) + 5)
    with pytest.raises(RuntimeError, match="outside its certified-training bounds"):
        obj(model, x, y, 1.0)
