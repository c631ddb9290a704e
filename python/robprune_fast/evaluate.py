"""Evaluation: benign accuracy, PGD robust accuracy (steps, restarts), AutoAttack on a subset.

Always in float32 and eval mode, whatever the training used: a weaker bf16 attack would flatter
the model.  Robust accuracy counts a point only if it is classified correctly both clean and under
attack, so only the correctly classified points are attacked.

A subset is always a seeded class-stratified sample (``data.stratified_subset``), never the first
points: an ImageFolder split is sorted by class, so its first 1,000 CIFAR-10 test images are all
airplanes.  The result describes the subset next to its figures.
"""

from __future__ import annotations

import torch

from . import attacks, bounds
from .data import Split, stratified_subset
from .modes import eval_mode


def _tensors(points: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = points.images.to(device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    return x, points.labels.to(device)


def _batches(points: Split, batch_size: int, device: torch.device):
    for i in range(0, len(points), batch_size):
        yield _tensors(points.select(slice(i, i + batch_size)), device)


def _describe(indices: torch.Tensor | None, split: Split, seed: int) -> dict:
    """The subset ``indices`` of ``split`` (None: all of it), as reported next to its figures."""
    labels = split.labels if indices is None else split.labels[indices]
    full = indices is None or len(indices) == len(split)
    return {"n": len(labels), "of": len(split), "selection": "full" if full else "stratified",
            "seed": None if full else seed,
            "per_class": torch.bincount(labels.cpu(), minlength=int(split.labels.max()) + 1).tolist()}


def pgd_flags(model, points: Split, eps: float, steps: int, step_size: float, restarts: int,
              norm: str, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point (on the CPU): classified correctly clean, and still correctly under PGD.

    Only the correctly classified points are attacked, so a point wrong when clean is never
    robust, whatever the attack returns.  The caller sets eval mode and the RNG (evaluate does).
    """
    device = torch.device(device)
    benign, robust = [], []
    for x, y in _batches(points, batch_size, device):
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        benign.append(ok)
        robust.append(ok.clone())
        if eps > 0 and ok.any():
            x_adv = attacks.pgd(model, x[ok], y[ok], eps, steps, step_size, restarts=restarts,
                                norm=norm)
            with torch.no_grad():
                robust[-1][ok] = model(x_adv).argmax(1) == y[ok]
    return torch.cat(benign).cpu(), torch.cat(robust).cpu()


def evaluate(model: torch.nn.Module, split: Split, *, eps: float, device="cpu", batch_size: int = 256,
             n: int | None = None, pgd_steps: int = 50, pgd_restarts: int = 1,
             step_size: float | None = None, norm: str = "linf", autoattack_n: int = 0,
             seed: int = 0, verify: tuple[str, ...] = ()) -> dict:
    """Accuracies on a seeded class-stratified sample of ``n`` points of ``split`` (all if None);
    AutoAttack on a stratified sample of ``autoattack_n`` of those points (0: skip).  PGD's default
    step is 2.5 * eps / steps.  ``result["subset"]`` (and ``result["autoattack"]["subset"]``) say
    which points: n, of how many, "full" or "stratified", the seed and the count per class.

    ``verify``: bound methods ("ibp", "crown-ibp", "crown") whose verified accuracy to report on
    the same points (L-inf only), with unstable-ReLU counts; ``verified_but_attacked`` counts points
    some method certified yet PGD broke, which a sound verifier never allows (must be 0)."""
    if len(split) == 0:
        raise ValueError("split is empty: there is nothing to evaluate")
    device = torch.device(device)
    model = model.to(device)
    step_size = 2.5 * eps / pgd_steps if step_size is None else step_size
    indices = None if n is None else stratified_subset(split, n, seed)
    points = split if indices is None else split.select(indices)
    if autoattack_n > len(points):
        raise ValueError(f"autoattack_n={autoattack_n} exceeds the {len(points)} points evaluated")
    # PGD's random starts: the same numbers on every call, without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        benign, robust = pgd_flags(model, points, eps, pgd_steps, step_size, pgd_restarts, norm,
                                   batch_size, device)
        result = {
            "n": len(points), "subset": _describe(indices, split, seed),
            "benign_acc": benign.float().mean().item(),
            "pgd": {"eps": eps, "norm": norm, "steps": pgd_steps, "restarts": pgd_restarts,
                    "step_size": step_size, "acc": robust.float().mean().item()},
        }
        if verify:
            result["verified"], result["verified_but_attacked"] = _verify(
                model, points, batch_size, device, eps, norm, verify, robust)
        if autoattack_n > 0:
            result["autoattack"] = _autoattack(model, points, robust, autoattack_n, eps, norm,
                                               batch_size, device, seed)
    return result


def _autoattack(model, points: Split, robust: torch.Tensor, k: int, eps: float, norm: str,
                batch_size: int, device: torch.device, seed: int) -> dict:
    """AutoAttack on a stratified sample of ``k`` of the PGD points, with PGD's figure on them."""
    inner = stratified_subset(points, k, seed)
    x, y = _tensors(points.select(inner), device)
    # One call: AutoAttack batches internally and skips points that are already wrong.
    x_adv = attacks.autoattack(model, x, y, eps, norm=norm, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        aa = (model(x_adv).argmax(1) == y).cpu()
    return {
        "eps": eps, "norm": norm, "version": "standard", "n": len(y),
        "subset": {**_describe(inner, points, seed), "drawn_from": "the PGD points"},
        "acc": aa.float().mean().item(),
        # The same points under PGD, so the two attacks compare like for like.
        "pgd_acc_same_points": robust[inner].float().mean().item(),
    }


def _verify(model, points: Split, batch_size, device, eps, norm, methods, robust):
    """{method: {"acc", "unstable", "neurons"}} and the number of certified points PGD broke."""
    if norm != "linf":
        raise ValueError(f"verify needs norm='linf' (the bounds are for L-inf balls), got {norm!r}")
    x, y = _tensors(points, device)
    out, certified = {}, torch.zeros(len(y), dtype=torch.bool)
    for method in methods:
        v = bounds.verified_accuracy(model, x, y, eps, method, batch_size=batch_size)
        out[method] = {"acc": v.verified_accuracy, "unstable": v.unstable, "neurons": v.neurons}
        certified |= v.verified.cpu()
    return out, int((certified & ~robust).sum())
