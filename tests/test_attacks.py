"""Attacks: known optima on linear models, the eps-ball and pixel range, restarts, bad arguments."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robprune_fast import attacks, models

EPS = 0.1


def linear_two_class(d=20, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.mul_(0.3)  # moderate margins: the loss gradient must not vanish in float32
    x = torch.rand(16, d)
    x[:, :3] = torch.tensor([0.0, 1.0, 0.05])  # coordinates where the pixel box clips the optimum
    y = torch.randint(0, 2, (16,))
    return model, x, y


def linf_optimum(model, x, y):
    w = model.weight.detach()
    direction = w[y] - w[1 - y]  # the margin of the true class grows along this
    return (x - EPS * direction.sign()).clamp(0, 1)


@pytest.mark.parametrize("random_init", [False, True])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_linf_reaches_linear_optimum(random_init, restarts):
    model, x, y = linear_two_class()
    x_adv = attacks.pgd(model, x, y, EPS, steps=20, step_size=EPS / 4, restarts=restarts,
                        random_init=random_init)
    torch.testing.assert_close(x_adv, linf_optimum(model, x, y), atol=1e-6, rtol=0)


def test_fgsm_is_one_full_step_to_the_linear_optimum():
    model, x, y = linear_two_class()
    torch.testing.assert_close(attacks.fgsm(model, x, y, EPS), linf_optimum(model, x, y),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("random_init,atol", [(False, 1e-6), (True, 1e-3)])
def test_pgd_l2_reaches_linear_optimum(random_init, atol):
    model, x, y = linear_two_class()
    x = 0.3 + 0.4 * x  # keep the L2 optimum inside the pixel box
    w = model.weight.detach()
    direction = w[y] - w[1 - y]
    expected = x - EPS * direction / direction.norm(dim=1, keepdim=True)
    x_adv = attacks.pgd(model, x, y, EPS, steps=100, step_size=EPS, norm="l2", random_init=random_init)
    torch.testing.assert_close(x_adv, expected, atol=atol, rtol=0)


def small_cnn_batch():
    torch.manual_seed(1)
    model = models.build("digits_cnn")
    x = torch.rand(32, 1, 8, 8)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0  # rows on the box's faces: random starts and steps must clip there
    y = torch.randint(0, 10, (32,))
    return model, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["pgd", "pgd_restarts", "fgsm", "fgsm_rs"])
def test_attacks_stay_in_ball_and_pixel_range(attack, norm):
    model, x, y = small_cnn_batch()
    eps = 0.3 if norm == "linf" else 1.5
    run = {
        "pgd": lambda: attacks.pgd(model, x, y, eps, 7, eps / 3, norm=norm),
        "pgd_restarts": lambda: attacks.pgd(model, x, y, eps, 3, eps, restarts=3, norm=norm),
        "fgsm": lambda: attacks.fgsm(model, x, y, eps, norm=norm),
        "fgsm_rs": lambda: attacks.fgsm(model, x, y, eps, 1.25 * eps, random_init=True, norm=norm),
    }[attack]
    model.train()
    x_adv = run()
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert (delta != 0).any()
    # The attack neither switches the model's mode nor leaves gradients on its parameters.
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_restarts_keep_each_samples_best():
    model, x, _ = small_cnn_batch()
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # every point right before the attack
    torch.manual_seed(5)
    single = attacks.pgd(model, x, y, 0.02, 3, 0.01)
    torch.manual_seed(5)  # the first of the restarts draws the same start as the single run
    multi = attacks.pgd(model, x, y, 0.02, 3, 0.01, restarts=4)
    with torch.no_grad():
        s_logits, m_logits = model(single), model(multi)
    s_wrong, m_wrong = s_logits.argmax(1) != y, m_logits.argmax(1) != y
    assert s_wrong.any() and m_wrong.sum() >= s_wrong.sum(), "nothing to compare"
    assert (m_wrong | ~s_wrong).all(), "a restart lost a sample the first run had broken"
    both_right = ~s_wrong & ~m_wrong
    assert both_right.sum() >= 4, "the loss comparison below needs points both runs left right"
    s_loss = F.cross_entropy(s_logits, y, reduction="none")
    m_loss = F.cross_entropy(m_logits, y, reduction="none")
    assert (m_loss[both_right] >= s_loss[both_right] - 1e-6).all()


def test_eps_zero_returns_the_input():
    model, x, y = small_cnn_batch()
    assert torch.equal(attacks.pgd(model, x, y, 0.0, 3, 0.1), x)
    assert torch.equal(attacks.fgsm(model, x, y, 0.0), x)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"eps": -0.1}, ValueError, "eps must be >= 0"),
    ({"eps": float("nan")}, ValueError, "eps must be >= 0"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"step_size": 0.0}, ValueError, "step_size must be > 0"),
    ({"restarts": 0}, ValueError, "restarts must be >= 1"),
    ({"norm": "l1"}, ValueError, "norm must be one of"),
    ({"x": "above"}, ValueError, r"x must lie in \[0, 1\]"),
    ({"x": "below"}, ValueError, r"x must lie in \[0, 1\]"),
    ({"x": "int"}, TypeError, "x must be a floating-point tensor"),
    ({"y": "short"}, ValueError, "y must have shape"),
])
def test_pgd_argument_errors_name_the_argument(kwargs, error, match):
    model, x, y = small_cnn_batch()
    args = {"eps": 0.1, "steps": 2, "step_size": 0.05, "restarts": 1, "norm": "linf"}
    args.update({k: v for k, v in kwargs.items() if k not in ("x", "y")})
    x = {"above": x + 0.5, "below": x - 0.5, "int": (x * 255).to(torch.uint8)}.get(kwargs.get("x"), x)
    y = y[:-1] if kwargs.get("y") == "short" else y
    with pytest.raises(error, match=match):
        attacks.pgd(model, x, y, **args)


def test_autoattack_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes the import fail
    model, x, y = small_cnn_batch()
    with pytest.raises(ImportError, match="pip install pyautoattack"):
        attacks.autoattack(model.eval(), x, y, 0.1)


def test_autoattack_subset_stays_in_ball():
    pytest.importorskip("pyautoattack")
    model, x, y = small_cnn_batch()
    x_adv = attacks.autoattack(model.eval(), x, y, 0.1, attacks=["apgd-ce"])
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
