"""Bound computation and certified-training step times: this project vs its pure-PyTorch path.

    python benchmarks/bounds_time.py [--batch 128] [--repeats 5] [--models cnn_small cnn_large]
                                     [--eps 2/255] [--device cpu] [--no-train] [--out FILE]

Bounds (no autograd, margin specification: K-1 = 9 rows per input, lower bounds only, as
verification and training need them, inside ``ops.weight_cache()`` as ``verified_accuracy`` runs
them), median milliseconds per call, the variants of each table taking turns within every
repetition:

  forward              a plain forward pass (the yardstick for IBP)
  ibp, crown-ibp       ``bounds.compute_bounds`` on robprune_fast.ops
  *_reference          the same engine with every ``ops`` function that has a twin in
                       ``robprune_fast.reference`` swapped for that twin (patched here only);
                       the largest difference between the two paths' bounds is reported too
  floor                an IBP pass plus ONE backward sweep of the 9 * batch specification rows
                       through the layers with plain torch ops (matmul, conv_transpose2d, a
                       multiply by precomputed ReLU slopes) and the final concretisation: the
                       least work any CROWN-IBP implementation does

Training steps (forward + backward + SGD step, median ms): natural; IBP with kappa = 0 at full eps;
CROWN-IBP (beta = 1, kappa = 0) with and without loss fusion.  Ratios to the natural step.

Results go to --out as JSON (with the machine, threads and torch version) and print as markdown.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robprune_fast import bounds, models, objectives, ops, train
from robprune_fast.bench import machine, timeit
from robprune_fast.demo import number


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["cnn_small", "cnn_large"],
                   choices=sorted(models.MODELS))
    p.add_argument("--eps", type=number, default=2 / 255)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timings")
    p.add_argument("--out", default="benchmarks/results/bounds_time.json")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    return args


def timed(fns: dict, repeats, device) -> dict:
    """Median milliseconds per call of each variant; the variants take turns within every
    repetition (bench.timeit), so the machine's drift hits them alike."""
    return {name: t * 1e3 for name, t in timeit(fns, device, repeats, warmup=1).items()}


def on_reference(fn):
    """fn, run with every op on its pure-PyTorch twin for the duration of each call."""
    def run():
        with ops.reference_only():
            return fn()
    return run


# --------------------------------------------------------------------------------------------------
# The floor: one plain backward sweep


def _layer_inputs(model, x):
    """Each top-level layer's input shape (per sample), from one clean pass."""
    shapes = []
    for layer in model:
        shapes.append(tuple(x.shape[1:]))
        x = layer(x)
    return shapes


def _relu_slopes(model, x, eps, C):
    """Per ReLU (by position in the model): CROWN's lower-side slopes from IBP's bounds."""
    details = bounds.bound_details(model, x, eps, "ibp", C, upper=False)
    slopes = {}
    relu_positions = [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    for i, (lower, upper) in zip(relu_positions, details.relu_bounds.values()):
        slopes[i] = torch.where(lower >= 0, 1.0, torch.where(upper <= 0, 0.0,
                                                             (upper >= -lower).float()))
    return slopes


def plain_sweep(model, A, slopes, shapes, x, eps):
    """A: (B, S, K).  Lower bound of A @ model(x') over the ball, with ReLUs fixed to ``slopes``
    (no intercepts: a cost floor, not a bound)."""
    b, s = A.shape[:2]
    for i in reversed(range(len(model))):
        layer = model[i]
        if isinstance(layer, nn.Linear):
            A = A @ layer.weight
        elif isinstance(layer, nn.Conv2d):
            c_in, h, w = shapes[i]
            flat = A.reshape(b * s, *A.shape[2:])
            out = F.conv_transpose2d(flat, layer.weight, None, layer.stride, layer.padding)
            pad = (0, w - out.shape[-1], 0, h - out.shape[-2])
            A = F.pad(out, pad).reshape(b, s, c_in, h, w)
        elif isinstance(layer, nn.ReLU):
            A = A * slopes[i].unsqueeze(1)
        elif isinstance(layer, nn.Flatten):
            A = A.reshape(b, s, *shapes[i])
        elif isinstance(layer, models.Normalize):
            A = A / layer.std
        else:
            raise TypeError(f"plain_sweep: unsupported layer {layer}")
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    c, r = ((up + lo) / 2).flatten(1).unsqueeze(-1), ((up - lo) / 2).flatten(1).unsqueeze(-1)
    flat = A.flatten(2)
    return (flat @ c - flat.abs() @ r).squeeze(-1)


# --------------------------------------------------------------------------------------------------


def bound_times(model, x, y, eps, repeats, device):
    C = bounds.margin_spec(y, 10)
    agreement = {}
    # Inside weight_cache(), as verified_accuracy runs bounds over a data set: |W * M| is made
    # once per model, not once per batch.
    with torch.no_grad(), ops.weight_cache():
        def method_run(method):
            return lambda: bounds.compute_bounds(model, x, eps, method, C, upper=False)[0]

        slopes, shapes = _relu_slopes(model, x, eps, C), _layer_inputs(model, x[:1])

        def floor():
            bounds.compute_bounds(model, x, eps, "ibp", C, upper=False)
            return plain_sweep(model, C, slopes, shapes, x, eps)

        fns = {"forward": lambda: model(x), "floor": floor}
        for method in ("ibp", "crown-ibp"):
            run = method_run(method)
            fns[method], fns[f"{method}_reference"] = run, on_reference(run)
            agreement[method] = (on_reference(run)() - run()).abs().max().item()
        times = timed(fns, repeats, device)
    return times, agreement


def train_times(name, x, y, eps, repeats, device):
    full = dict(eps=eps, eps_ramp=0.0, kappa_start=0.0, kappa_end=0.0)
    variants = {
        "natural": objectives.build("natural"),
        "ibp": objectives.build("ibp", **full),
        "crown-ibp": objectives.build("crown-ibp", beta_start=1.0, beta_end=1.0, **full),
        "crown-ibp_fused": objectives.build("crown-ibp", beta_start=1.0, beta_end=1.0,
                                            loss_fusion=True, **full),
    }
    fns = {}
    for label, objective in variants.items():
        torch.manual_seed(0)
        model = train.prepare(models.build(name), device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        fns[label] = (lambda m, o, obj: lambda: train.train_step(m, o, obj, x, y, 1.0, 1e-3))(
            model, optimizer, objective)
    return timed(fns, repeats, device)


def markdown(results) -> str:
    lines = ["| model | forward | IBP | IBP ref | IBP/forward | CROWN-IBP | CROWN-IBP ref | floor "
             "| CROWN-IBP/floor |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        t = r["bounds_ms"]
        lines.append(f"| {name} | {t['forward']:.1f} | {t['ibp']:.1f} | {t['ibp_reference']:.1f} "
                     f"| {t['ibp'] / t['forward']:.2f}x | {t['crown-ibp']:.1f} "
                     f"| {t['crown-ibp_reference']:.1f} | {t['floor']:.1f} "
                     f"| {t['crown-ibp'] / t['floor']:.2f}x |")
    if any("train_ms" in r for r in results["models"].values()):
        lines += ["", "| model | natural step | IBP step (kappa=0) | CROWN-IBP step | "
                  "CROWN-IBP fused step |", "|---|---|---|---|---|"]
        for name, r in results["models"].items():
            t = r.get("train_ms")
            if t:
                ratio = lambda k: f"{t[k]:.1f} ({t[k] / t['natural']:.2f}x)"
                lines.append(f"| {name} | {t['natural']:.1f} | {ratio('ibp')} | "
                             f"{ratio('crown-ibp')} | {ratio('crown-ibp_fused')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = {"batch": args.batch, "repeats": args.repeats, "eps": args.eps,
               "device": str(device), "machine": machine(device),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "models": {}}
    for name in args.models:
        shape = models.INPUT_SHAPES[name]
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
        model = models.build(name).to(device).eval()
        times, agreement = bound_times(model, x, y, args.eps, args.repeats, device)
        results["models"][name] = {"bounds_ms": times, "agreement": agreement}
        if not args.no_train:
            results["models"][name]["train_ms"] = train_times(name, x, y, args.eps, args.repeats,
                                                              device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\n{results['machine']}, {results['threads']} threads, device {device} -> {out}")
    return results


if __name__ == "__main__":
    main()
