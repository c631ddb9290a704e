"""Evaluation: benign accuracy, PGD robust accuracy (steps, restarts), AutoAttack on a subset.

Always in float32 and eval mode, whatever the training used: a weaker bf16 attack would flatter
the model.  Robust accuracy counts a point only if it is classified correctly both clean and under
attack, so only the correctly classified points are attacked.
"""

from __future__ import annotations

import torch

from . import attacks, bounds
from .data import Split
from .modes import eval_mode


def _batches(split: Split, n: int | None, batch_size: int, device: torch.device):
    n = len(split) if n is None else min(n, len(split))
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        x = split.images[i:j].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, split.labels[i:j].to(device)


def evaluate(model: torch.nn.Module, split: Split, *, eps: float, device="cpu", batch_size: int = 256,
             n: int | None = None, pgd_steps: int = 50, pgd_restarts: int = 1,
             step_size: float | None = None, norm: str = "linf", autoattack_n: int = 0,
             seed: int = 0, verify: tuple[str, ...] = ()) -> dict:
    """Accuracies on the first ``n`` points of ``split`` (all if None); AutoAttack on the first
    ``autoattack_n`` of those (0: skip).  PGD's default step is 2.5 * eps / steps.

    ``verify``: bound methods ("ibp", "crown-ibp", "crown") whose verified accuracy to report on
    the same points (L-inf only), with unstable-ReLU counts; ``verified_but_attacked`` counts points
    some method certified yet PGD broke, which a sound verifier never allows (must be 0)."""
    device = torch.device(device)
    model = model.to(device)
    step_size = 2.5 * eps / pgd_steps if step_size is None else step_size
    benign, robust = [], []  # per-point flags, in split order
    # PGD's random starts: the same numbers on every call, without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        for x, y in _batches(split, n, batch_size, device):
            with torch.no_grad():
                ok = model(x).argmax(1) == y
            benign.append(ok)
            robust.append(ok.clone())
            if eps > 0 and ok.any():
                x_adv = attacks.pgd(model, x[ok], y[ok], eps, pgd_steps, step_size,
                                    restarts=pgd_restarts, norm=norm)
                with torch.no_grad():
                    robust[-1][ok] = model(x_adv).argmax(1) == y[ok]
        benign, robust = torch.cat(benign).cpu(), torch.cat(robust).cpu()
        result = {
            "n": len(benign), "benign_acc": benign.float().mean().item(),
            "pgd": {"eps": eps, "norm": norm, "steps": pgd_steps, "restarts": pgd_restarts,
                    "step_size": step_size, "acc": robust.float().mean().item()},
        }
        if verify:
            result["verified"], result["verified_but_attacked"] = _verify(
                model, split, n, batch_size, device, eps, norm, verify, robust)
        if autoattack_n > 0:
            # One call: AutoAttack batches internally and skips points that are already wrong.
            k = min(autoattack_n, len(benign))  # a subset of the points PGD saw
            x, y = next(_batches(split, k, k, device))
            x_adv = attacks.autoattack(model, x, y, eps, norm=norm, batch_size=batch_size, seed=seed)
            with torch.no_grad():
                aa = (model(x_adv).argmax(1) == y).cpu()
            result["autoattack"] = {
                "eps": eps, "norm": norm, "version": "standard", "n": len(y),
                "acc": aa.float().mean().item(),
                # The same points under PGD, so the two attacks compare like for like.
                "pgd_acc_same_points": robust[:len(y)].float().mean().item(),
            }
    return result


def _verify(model, split, n, batch_size, device, eps, norm, methods, robust):
    """{method: {"acc", "unstable", "neurons"}} and the number of certified points PGD broke."""
    if norm != "linf":
        raise ValueError(f"verify needs norm='linf' (the bounds are for L-inf balls), got {norm!r}")
    x, y = next(_batches(split, n, len(split) if n is None else n, device))
    out, certified = {}, torch.zeros(len(y), dtype=torch.bool)
    for method in methods:
        v = bounds.verified_accuracy(model, x, y, eps, method, batch_size=batch_size)
        out[method] = {"acc": v.verified_accuracy, "unstable": v.unstable, "neurons": v.neurons}
        certified |= v.verified.cpu()
    return out, int((certified & ~robust).sum())
