"""A network pruned to 90% in every layer against the dense one: an IBP training step, on
the compressed path and on the dense one (masked layers, whose weights are dense parameters),
and with the kept weights as the parameters (nn.compress: what fine-tuning with the masks fixed
trains), and the sound bounds that verification computes (no gradients, the layers' path left at
"auto").

    python benchmarks/pruned_ibp_step.py --model cnn_large --sparsity 0.9 --batch 128 --repeats 7

The step is what certified training runs: IBP bounds of the margins at full eps (kappa 0),
their worst-case cross-entropy, the backward pass and an SGD step. The steps take turns in every
repetition (bench.timeit), and so do the bounds, in a rotation of their own: a step timed just
after a CROWN-IBP bound (800 ms, much larger buffers) finds the caches and the allocator's heap
in a state no training loop leaves them in (steps alternating with the bounds moved the ratio
between 1.8x and 2.2x from run to run). Medians in milliseconds and the ratios to the dense
variant, as JSON.
"""
from __future__ import annotations

import argparse
import copy

import torch

from robprune_fast import bounds, models, objectives, pruning
from robprune_fast import nn as rnn
from robprune_fast.bench import machine, timeit, write_result


def step_fn(model, objective, x, y):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss, _ = objective(model, x, y, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bounds_fn(model, x, y, eps, method):
    C = bounds.margin_spec(y, 10)

    def run():
        with torch.no_grad():
            bounds.compute_bounds(model, x, eps, method, C, upper=False)
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn_large", choices=sorted(models.MODELS))
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/pruned_ibp_step_cpu.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dense = models.build(args.model)
    shape = models.INPUT_SHAPES[args.model]
    x, y = torch.rand(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    objective = objectives.build("ibp", eps=args.eps, eps_ramp=0.0, kappa_start=0.0, kappa_end=0.0)
    variants = {"dense": dense}
    for path in ("dense", "sparse", "auto"):
        pruned = rnn.convert(copy.deepcopy(dense))
        pruning.prune(pruned, args.sparsity)
        for layer in rnn.masked_modules(pruned).values():
            layer.path = path
        variants[f"pruned_{path}_path"] = pruned
    variants["pruned_kept_values"] = rnn.compress(copy.deepcopy(variants["pruned_sparse_path"]))
    # Each variant is compared with the dense model doing the same thing, in the same rotation.
    steps, verification, baseline = {}, {}, {}
    for name in ("dense", "pruned_dense_path", "pruned_sparse_path", "pruned_kept_values"):
        steps[f"step_{name}"] = step_fn(variants[name], objective, x, y)
        baseline[f"step_{name}"] = "step_dense"
    for method in ("ibp", "crown-ibp"):
        for name in ("dense", "pruned_auto_path"):
            verification[f"{method}_bounds_{name}"] = bounds_fn(variants[name], x, y, args.eps, method)
            baseline[f"{method}_bounds_{name}"] = f"{method}_bounds_dense"
    ms = {}
    for fns in (steps, verification):
        ms.update({name: t * 1e3 for name, t in timeit(fns, torch.device("cpu"), args.repeats).items()})
    result = {"model": args.model, "sparsity": args.sparsity, "batch": args.batch, "eps": args.eps,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": machine(), "ms": ms,
              "dense_over": {name: ms[baseline[name]] / t for name, t in ms.items()}}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
