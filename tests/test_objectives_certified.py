"""Certified-training objectives (IBP, CROWN-IBP), their schedules, Shi et al.'s warm-up options,
training on pruned models, and the soundness of the fused CE bound (loss_fusion)."""
import importlib.util
import math
import pathlib
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from robprune_fast import attacks, bounds, data, loss_fusion, models, objectives, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        models.Normalize((0.3,), (0.4,)),
        nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 5),
    )


def _batch(n=6, k=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, k, (n,), generator=g))


# --------------------------------------------------------------------------------------------------
# schedules


def test_eps_ramp_linear_and_smooth():
    f = objectives.eps_fraction
    assert f(0.05, 0.1, 0.4, "linear") == 0 and f(0.1, 0.1, 0.4, "linear") == 0
    assert f(0.3, 0.1, 0.4, "linear") == pytest.approx(0.5)
    assert f(0.5, 0.1, 0.4, "linear") == 1 and f(0.9, 0.1, 0.4, "linear") == 1
    assert f(0.3, 0.0, 0.0, "smooth") == 1  # no ramp: full eps at once
    ts = [i / 1000 for i in range(1001)]
    smooth = [objectives.smooth_ramp(t) for t in ts]
    assert smooth[0] == 0 and smooth[-1] == pytest.approx(1)
    assert all(b >= a for a, b in zip(smooth, smooth[1:]))  # monotone
    # continuous value and slope at the switch to the linear part
    mid, h = objectives.SMOOTH_MID, 1e-6
    left = (objectives.smooth_ramp(mid - h) - objectives.smooth_ramp(mid - 2 * h)) / h
    right = (objectives.smooth_ramp(mid + 2 * h) - objectives.smooth_ramp(mid + h)) / h
    assert left == pytest.approx(right, rel=1e-3)
    assert smooth[100] < 0.1 < smooth[500] and smooth[500] < 0.5  # slow start, then catches up


def test_kappa_and_beta_schedules():
    s = lambda p: objectives.certified_schedule(p, 0.2, eps_start=0.2, eps_ramp=0.4,
                                                kappa_start=1, kappa_end=0.5, beta_start=1,
                                                beta_end=0, reg_lambda=0.5)
    assert (s(0.1).eps, s(0.1).kappa, s(0.1).beta, s(0.1).reg_weight) == (0, 1, 1, 0.5)
    mid = s(0.4)
    assert mid.eps == pytest.approx(0.1) and mid.kappa == pytest.approx(0.75)
    assert mid.beta == pytest.approx(0.5) and mid.reg_weight == pytest.approx(0.25)
    end = s(0.8)
    assert (end.eps, end.kappa, end.beta, end.reg_weight) == (pytest.approx(0.2), 0.5, 0, 0)


def test_objective_follows_the_schedule():
    """Before the ramp the loss is the clean CE; at full eps with kappa = 0 it is the CE of the
    worst-case logits of the chosen bounds."""
    model, (x, y) = _small_cnn(), _batch()
    clean = F.cross_entropy(model(x), y)
    ibp = objectives.build("ibp", eps=0.05, eps_start=0.5, eps_ramp=0.0, kappa_start=0, kappa_end=0)
    assert ibp(model, x, y, 0.2)[0].item() == pytest.approx(clean.item(), rel=1e-6)
    C = bounds.margin_spec(y, 5)
    for name, method, extra in [("ibp", "ibp", {}),
                                ("crown-ibp", "crown-ibp", dict(beta_start=1, beta_end=1))]:
        obj = objectives.build(name, eps=0.05, eps_ramp=0.0, kappa_start=0, kappa_end=0, **extra)
        loss, z = obj(model, x, y, 1.0)
        lower, _ = bounds.compute_bounds(model, x, 0.05, method, C, upper=False, sound=False)
        expected = loss_fusion.robust_ce(lower, y)[0].mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.equal(z.argmax(1) == y, (lower > 0).all(1))


# --------------------------------------------------------------------------------------------------
# training


def _train_digits(objective, epochs, seed=0):
    ds = data.load("digits")
    torch.manual_seed(seed)
    model = models.build("digits_mlp")
    config = train.TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=2e-3,
                               weight_decay=0, progress_bar=False, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        train.train(model, ds.train, objective, config, out)
    x, y = ds.test.images.float() / 255, ds.test.labels
    return model, bounds.verified_accuracy(model, x, y, 0.05, "ibp")


def test_ibp_training_raises_verified_accuracy():
    torch.set_num_threads(1)
    _, natural = _train_digits(objectives.build("natural"), epochs=10)
    _, ibp = _train_digits(objectives.build("ibp", eps=0.05, eps_ramp=0.4), epochs=10)
    assert natural.clean_accuracy > 0.9 and ibp.clean_accuracy > 0.85
    assert ibp.verified_accuracy > 0.4
    assert ibp.verified_accuracy > natural.verified_accuracy + 0.3


@pytest.mark.parametrize("name, extra", [("ibp", dict(reg=True)),
                                         ("crown-ibp", dict(loss_fusion=True))])
def test_training_a_pruned_model(name, extra):
    """IBP / CROWN-IBP steps on an l1-pruned model: the pruned weights stay zero, and their
    trainable originals get no gradient (the bounds see the masks, not weight_orig)."""
    model = _small_cnn()
    layers = [model[1], model[4], model[6]]
    for layer in layers:
        prune.l1_unstructured(layer, "weight", amount=0.6)
    objectives.ibp_initialization(model)
    before = [layer.weight_orig.detach().clone() for layer in layers]
    objective = objectives.build(name, eps=0.05, eps_ramp=0.5, kappa_end=0.0, **extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _batch(n=16)
    losses = [train.train_step(model, optimizer, objective, x, y, p, 0.05)[0].item()
              for p in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert all(math.isfinite(v) for v in losses)
    for layer, old in zip(layers, before):
        pruned = layer.weight_mask == 0
        assert torch.equal(layer.weight[pruned], torch.zeros_like(layer.weight[pruned]))
        assert torch.equal(layer.weight_orig[pruned], old[pruned])
        assert not torch.equal(layer.weight_orig[~pruned], old[~pruned])


def test_ibp_initialization_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    last = model[3].weight.detach().clone()
    prune.l1_unstructured(model[1], "weight", amount=0.75)  # 100 weights kept per unit
    objectives.ibp_initialization(model)
    std = model[1].weight_orig.std().item()
    assert std == pytest.approx(math.sqrt(2 * math.pi) / 100, rel=0.05)
    assert torch.equal(model[3].weight, last)  # the last layer keeps its initialisation


def test_warmup_regularizer_terms():
    """Balanced ReLUs and a tight interval cost nothing; an exploding interval and one-sided
    ReLUs cost the maximum of each term (1 each, per layer, averaged)."""
    lower = torch.tensor([[1.0, 2.0, -3.0, -2.0]])
    bal = {"r": (lower - 0.1, lower + 0.1)}
    assert objectives.warmup_regularizer(bal, torch.tensor(0.1)).item() == pytest.approx(0)
    dead = {"r": (torch.tensor([[-1e6, -2e6]]), torch.tensor([[-1.0, -2.0]]))}
    assert objectives.warmup_regularizer(dead, torch.tensor(0.01)).item() == pytest.approx(3)


# --------------------------------------------------------------------------------------------------
# loss fusion


def test_exp_chord_is_above_exp():
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(2000, dtype=torch.float64, generator=g) * 5
    up = lo + torch.rand(2000, dtype=torch.float64, generator=g) * 10
    up[:10] = lo[:10]  # zero width
    shift = up.clamp(min=0)
    slope, intercept = loss_fusion.exp_chord(lo, up, shift)
    for w in torch.linspace(0, 1, 21, dtype=torch.float64):
        t = lo + w * (up - lo)
        # up to rounding of the terms summed (the intercept cancels slope * t when |t| is large)
        slack = 1e-14 * (slope * t.abs() + intercept.abs())
        assert (slope * t + intercept >= torch.exp(t - shift) - slack).all()


def _trained_float64_model():
    model = _small_cnn(seed=3).double()
    x, y = _batch(n=32, seed=4, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # some structure, so margins are not all tiny
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2])
def test_fused_bound_is_sound(eps):
    """The fused bound is >= the CE loss at random points and at PGD points of the ball."""
    model, x, y = _trained_float64_model()
    with torch.no_grad():
        bound = loss_fusion.fused_ce_bound(model, x, y, eps, 5)[0]
        g = torch.Generator().manual_seed(5)
        for _ in range(50):
            u = torch.rand(8, *x.shape, generator=g, dtype=x.dtype) * 2 - 1
            corner = torch.rand(u.shape, generator=g, dtype=x.dtype) < 0.5  # box corners too
            for delta in torch.where(corner, u.sign(), u):
                xs = (x + eps * delta).clamp(0, 1)
                loss = F.cross_entropy(model(xs), y, reduction="none")
                assert (bound >= loss - 1e-9).all()
    x_adv = attacks.pgd(model, x, y, eps, steps=50, step_size=eps / 10, restarts=3)
    with torch.no_grad():
        loss = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (bound >= loss - 1e-9).all()


def test_fused_bound_is_exact_at_zero_radius_and_differentiable():
    model, x, y = _trained_float64_model()
    bound, b = loss_fusion.fused_ce_bound(model, x, y, 0.0, 5)
    margin_lower, relu_bounds = b.ibp_lower, b.relu_bounds
    exact = F.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(bound, exact, atol=1e-9)
    assert len(relu_bounds) == 2 and margin_lower.shape == (32, 4)
    bound = loss_fusion.fused_ce_bound(model, x, y, 0.05, 5)[0]
    bound.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_bound_handles_huge_margins():
    """No overflow when the interval bounds are in the thousands (early, exploding training)."""
    model, x, y = _trained_float64_model()
    with torch.no_grad():
        model[-1].weight.mul_(500)
    bound = loss_fusion.fused_ce_bound(model.float(), x.float(), y, 0.3, 5)[0]
    assert torch.isfinite(bound).all() and (bound > 100).any()


# --------------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=0.1, kappa_start=1.5), "kappa_start must lie in"),
    (dict(eps=0.1, kappa_end=-0.2), "kappa_end must lie in"),
    (dict(eps=0.1, schedule="cosine"), "schedule must be one of"),
    (dict(eps=0.1, eps_start=0.6, eps_ramp=0.6), "eps_start \\+ eps_ramp"),
    (dict(eps=0.1, eps_ramp=2), "eps_ramp must lie in"),
    (dict(eps=0.1, reg_tol=0), "reg_tol must be > 0"),
])
def test_bad_hyper_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        objectives.build(name, **kwargs)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta_end must lie in"):
        objectives.build("crown-ibp", eps=0.1, beta_end=1.2)
    with pytest.raises(TypeError, match="beta_start"):
        objectives.build("ibp", eps=0.1, beta_start=1.0)  # IBP has no beta


# --------------------------------------------------------------------------------------------------
# the benchmark scripts, at toy sizes


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounds_time_runs(tmp_path):
    results = _script("bounds_time").main(["--batch", "2", "--repeats", "1", "--models",
                                           "cnn_small", "--out", str(tmp_path / "b.json")])
    assert (tmp_path / "b.json").exists()
    row = results["models"]["cnn_small"]
    assert row["agreement"]["ibp"] < 1e-3 and row["agreement"]["crown-ibp"] < 1e-3
    assert all(v > 0 for v in row["bounds_ms"].values())


def test_verified_train_runs(tmp_path):
    results = _script("verified_train").main([
        "--dataset", "digits", "--method", "crown-ibp", "--loss-fusion", "--ibp-init", "--reg",
        "--eps", "0.05", "--epochs", "1", "--subset", "128", "--eval-n", "32",
        "--pgd-steps", "5", "--out", str(tmp_path / "run"), "--no-progress"])
    ev = results["eval"]
    assert ev["n"] == 32 and "ibp" in ev["verified"] and "crown-ibp" in ev["verified"]
    assert ev["verified_but_attacked"] == 0
