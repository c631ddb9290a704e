"""Evaluation: the seeded class-stratified subset, benign / PGD / verified / AutoAttack figures."""

from types import SimpleNamespace

import pytest
import torch

from robprune_fast import attacks, bounds, data, evaluate, models, objectives, train


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """digits_mlp after three natural epochs: about 95% of the test points right."""
    torch.manual_seed(0)
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(lr=0.05, progress_bar=False)
    optimizer = train.make_optimizer(model, cfg)
    natural = objectives.build("natural")
    batches = data.Batches(digits.train, 64, seed=0)
    for epoch in range(3):
        for x, y in batches.epoch(epoch):
            train.train_step(model, optimizer, natural, x, y, 0.0, 0.05)
    return model.eval()


def class_sorted(split):
    """The split ordered by class, as an ImageFolder's is."""
    order = torch.argsort(split.labels, stable=True)
    return split.select(order)


def clean_correct(model, points):
    with torch.no_grad():
        return model(points.images.float() / 255).argmax(1) == points.labels


class Constant(torch.nn.Module):
    """Predicts class 0 for every input."""

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()


# --- the subset ----------------------------------------------------------------------------------

def test_evaluate_reports_its_seeded_stratified_subset(digits, trained):
    result = evaluate.evaluate(trained, digits.test, eps=0.0, n=100, seed=3)
    idx = data.stratified_subset(digits.test, 100, seed=3)
    assert result["n"] == 100
    assert result["subset"] == {
        "n": 100, "of": 450, "selection": "stratified", "seed": 3,
        "per_class": torch.bincount(digits.test.labels[idx], minlength=10).tolist()}
    assert result["benign_acc"] == clean_correct(trained, digits.test.select(idx)).float().mean().item()
    full = evaluate.evaluate(trained, digits.test, eps=0.0)
    assert full["subset"] == {"n": 450, "of": 450, "selection": "full", "seed": None,
                              "per_class": torch.bincount(digits.test.labels).tolist()}


def test_a_class_sorted_split_is_not_judged_on_one_class(digits):
    """The first 100 points of a class-sorted split are all class 0, which Constant always says."""
    result = evaluate.evaluate(Constant(), class_sorted(digits.test), eps=0.0, n=100)
    assert result["subset"]["per_class"] == [10] * 10
    assert result["benign_acc"] == pytest.approx(0.1)


def test_subset_size_errors(digits, trained):
    with pytest.raises(ValueError, match="n=451 exceeds the split's 450 points"):
        evaluate.evaluate(trained, digits.test, eps=0.0, n=451)
    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate.evaluate(trained, digits.test, eps=0.0, n=0)
    with pytest.raises(ValueError, match="autoattack_n=61 exceeds the 60 points evaluated"):
        evaluate.evaluate(trained, digits.test, eps=0.1, n=60, pgd_steps=1, autoattack_n=61)
    empty = data.Split(digits.test.images[:0], digits.test.labels[:0])
    with pytest.raises(ValueError, match="split is empty"):
        evaluate.evaluate(trained, empty, eps=0.0)


# --- benign and PGD ------------------------------------------------------------------------------

def test_benign_and_pgd_counts(digits, trained):
    points = digits.test.select(data.stratified_subset(digits.test, 200, seed=0))
    benign, robust = evaluate.pgd_flags(trained, points, eps=0.05, steps=10, step_size=0.0125,
                                        restarts=1, norm="linf", batch_size=64, device="cpu")
    assert torch.equal(benign, clean_correct(trained, points))
    assert 0.9 < benign.float().mean() < 1.0  # a model that is right on most, wrong on some
    assert not (robust & ~benign).any()
    assert 0 < robust.sum() < benign.sum()  # the attack breaks some points, not all
    result = evaluate.evaluate(trained, digits.test, eps=0.05, n=200, pgd_steps=10, batch_size=64)
    assert result["benign_acc"] == benign.float().mean().item()
    assert result["pgd"]["acc"] <= result["benign_acc"]


def test_a_misclassified_point_is_never_robust(digits, trained, monkeypatch):
    """Even an "attack" that hands back an input the model gets right cannot make a point that
    is wrong when clean count as robust."""
    points = digits.test.select(data.stratified_subset(digits.test, 100, seed=0))
    right = clean_correct(trained, points)
    wrong_labels = points.labels.clone()
    wrong_labels[:30] = (wrong_labels[:30] + 1) % 10  # now the model is wrong on these
    relabelled = data.Split(points.images, wrong_labels)
    # One clean image per class that the model classifies as that class.
    x_all = digits.test.images.float() / 255
    with torch.no_grad():
        predicted = trained(x_all).argmax(1)
    prototypes = torch.stack([x_all[predicted == c][0] for c in range(10)])
    monkeypatch.setattr(attacks, "pgd", lambda model, x, y, *a, **k: prototypes[y])
    benign, robust = evaluate.pgd_flags(trained, relabelled, eps=0.1, steps=1, step_size=0.1,
                                        restarts=1, norm="linf", batch_size=32, device="cpu")
    assert not benign[:30].any() and torch.equal(benign[30:], right[30:])
    assert torch.equal(robust, benign)  # the helping attack leaves right points right, no more
    result = evaluate.evaluate(trained, relabelled, eps=0.1, pgd_steps=1, batch_size=32)
    assert result["pgd"]["acc"] == result["benign_acc"] == benign.float().mean().item()


@pytest.mark.parametrize("step_size,norm,restarts", [(None, "linf", 1), (0.03, "l2", 3)])
def test_the_attack_gets_the_settings_asked_for(digits, trained, monkeypatch, step_size, norm,
                                                restarts):
    """PGD runs with the steps, step (default 2.5 eps / steps), restarts and norm asked for."""
    calls = []

    def recording_pgd(model, x, y, eps, steps, step, restarts=1, norm="linf"):
        calls.append((eps, steps, step, restarts, norm))
        return x
    monkeypatch.setattr(attacks, "pgd", recording_pgd)
    evaluate.evaluate(trained, digits.test, eps=0.2, n=50, pgd_steps=8, step_size=step_size,
                      pgd_restarts=restarts, norm=norm)
    assert calls and all(c == (0.2, 8, step_size or 2.5 * 0.2 / 8, restarts, norm) for c in calls)


def test_restarts_are_at_least_as_strong(digits, trained):
    """With one batch, the first restart is the single run's attack and the best one is kept."""
    points = digits.test.select(data.stratified_subset(digits.test, 200, seed=0))
    flags = {}
    for restarts in (1, 4):
        torch.manual_seed(0)
        flags[restarts] = evaluate.pgd_flags(trained, points, eps=0.05, steps=5, step_size=0.02,
                                             restarts=restarts, norm="linf", batch_size=200,
                                             device="cpu")[1]
    assert 0 < flags[1].sum() < clean_correct(trained, points).sum()  # neither vacuous nor total
    assert not (flags[4] & ~flags[1]).any()
    accs = [evaluate.evaluate(trained, digits.test, eps=0.05, n=200, pgd_steps=5, step_size=0.02,
                              pgd_restarts=r, batch_size=200)["pgd"]["acc"] for r in (1, 4)]
    assert accs[1] <= accs[0]


# --- verification --------------------------------------------------------------------------------

def test_verification_uses_the_same_points(digits, trained):
    eps = 0.01
    result = evaluate.evaluate(trained, class_sorted(digits.test), eps=eps, n=100, pgd_steps=10,
                               verify=("ibp", "crown-ibp"), seed=1)
    points = class_sorted(digits.test).select(
        data.stratified_subset(class_sorted(digits.test), 100, seed=1))
    for method in ("ibp", "crown-ibp"):
        direct = bounds.verified_accuracy(trained, points.images.float() / 255, points.labels, eps,
                                          method)
        assert result["verified"][method]["acc"] == direct.verified_accuracy
        assert result["verified"][method]["unstable"] == direct.unstable
        assert result["verified"][method]["neurons"] == direct.neurons
    assert result["verified_but_attacked"] == 0  # a sound verifier is never contradicted
    assert 0 < result["verified"]["ibp"]["acc"] <= result["verified"]["crown-ibp"]["acc"] \
        <= result["pgd"]["acc"] <= result["benign_acc"]
    # IBP leaves at least as many ReLUs unstable as CROWN-IBP's IBP stage does (the same boxes).
    assert 0 < sum(result["verified"]["ibp"]["unstable"].values()) <= 100 * sum(
        result["verified"]["ibp"]["neurons"].values())


def test_float_images_in_the_unit_range_are_not_rescaled(digits, trained):
    """A split may hold float pixels in [0, 1] (a user's own); only uint8 ones are divided by 255."""
    points = digits.test.select(torch.arange(60))
    floats = data.Split(points.images.float() / 255, points.labels)
    a = evaluate.evaluate(trained, points, eps=0.02, pgd_steps=5, verify=("ibp",))
    b = evaluate.evaluate(trained, floats, eps=0.02, pgd_steps=5, verify=("ibp",))
    assert a["benign_acc"] == b["benign_acc"] > 0.5
    assert a["verified"]["ibp"]["acc"] == b["verified"]["ibp"]["acc"]


def test_verification_needs_the_linf_norm(digits, trained):
    with pytest.raises(ValueError, match="verify needs norm='linf'"):
        evaluate.evaluate(trained, digits.test, eps=0.5, n=20, pgd_steps=2, norm="l2",
                          verify=("ibp",))


def test_verified_but_attacked_counts_certified_points_pgd_broke(digits, trained, monkeypatch):
    """A verifier that (unsoundly) certifies every point is contradicted once per point PGD broke."""
    points = digits.test.select(data.stratified_subset(digits.test, 100, seed=0))
    torch.manual_seed(0)
    _, robust = evaluate.pgd_flags(trained, points, eps=0.1, steps=10, step_size=0.025,
                                   restarts=1, norm="linf", batch_size=256, device="cpu")
    everything = SimpleNamespace(verified=torch.ones(100, dtype=torch.bool), verified_accuracy=1.0,
                                 unstable={}, neurons={})
    monkeypatch.setattr(bounds, "verified_accuracy", lambda *a, **k: everything)
    result = evaluate.evaluate(trained, digits.test, eps=0.1, n=100, pgd_steps=10, verify=("ibp",))
    assert result["verified_but_attacked"] == int((~robust).sum()) > 0


# --- AutoAttack ----------------------------------------------------------------------------------

def test_autoattack_runs_on_a_stratified_subset_of_the_pgd_points(digits, trained, monkeypatch):
    seen = {}

    def fake_autoattack(model, x, y, eps, **kw):  # the optional package is not needed to check this
        seen["x"], seen["y"] = x, y
        return x
    monkeypatch.setattr(attacks, "autoattack", fake_autoattack)
    split = class_sorted(digits.test)
    result = evaluate.evaluate(trained, split, eps=0.05, n=200, pgd_steps=5, autoattack_n=50,
                               seed=2)
    points = split.select(data.stratified_subset(split, 200, seed=2))
    inner = data.stratified_subset(points, 50, seed=2)
    assert torch.equal(seen["y"], points.labels[inner])
    assert torch.equal(seen["x"], points.images[inner].float() / 255)
    aa = result["autoattack"]
    assert aa["n"] == 50 and aa["subset"] == {
        "n": 50, "of": 200, "selection": "stratified", "seed": 2, "drawn_from": "the PGD points",
        "per_class": [5] * 10}
    # The identity "attack" breaks nothing: AutoAttack's figure is the clean one on its points.
    assert aa["acc"] == clean_correct(trained, points.select(inner)).float().mean().item()
    torch.manual_seed(2)  # what evaluate seeds PGD's random starts with
    _, robust = evaluate.pgd_flags(trained, points, eps=0.05, steps=5, step_size=0.025,
                                   restarts=1, norm="linf", batch_size=256, device="cpu")
    assert aa["pgd_acc_same_points"] == robust[inner].float().mean().item() < aa["acc"]
