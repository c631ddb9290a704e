"""Each layer of cnn_large pruned to a sparsity: its interval (IBP) forward and forward+backward,
the fused dense op against the compressed one, as a training step calls them (a pending ReLU
fused into every layer after the first; gradients into centre, radius, weight and bias).

    python benchmarks/pruned_layers.py --sparsity 0.9 --batch 128 --repeats 5

It shows which layers a pruned network's IBP step loses on (benchmarks/pruned_ibp_step.py times
the whole step). Variants take turns in every repetition (bench.timeit); medians in ms, as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robprune_fast import ops
from robprune_fast.bench import machine, timeit
from robprune_fast.ops import sparse

# name, (in, out, kernel, stride, padding) or (in, out) for linear, input (C, H, W), relu_in
LAYERS = [("conv1", (3, 32, 3, 1, 1), (3, 32, 32), False),
          ("conv2", (32, 32, 4, 2, 1), (32, 32, 32), True),
          ("conv3", (32, 64, 3, 1, 1), (32, 16, 16), True),
          ("conv4", (64, 64, 4, 2, 1), (64, 16, 16), True),
          ("fc1", (4096, 512), None, True),
          ("fc2", (512, 512), None, True)]


def layer_fn(op, spec, in_shape, relu_in, batch, sparsity, backward):
    conv = in_shape is not None
    weight = torch.randn(*spec[1::-1], spec[2], spec[2]) if conv else torch.randn(spec[1], spec[0])
    mask = (torch.rand(weight.shape) >= sparsity).float()
    shape = (batch, *in_shape) if conv else (batch, spec[0])
    leaves = [torch.randn(shape), torch.rand(shape), weight, torch.randn(weight.shape[0])]
    for t in leaves:
        t.requires_grad_(backward)
    c, r, w, b = leaves
    geometry = dict(stride=spec[3], padding=spec[4]) if conv else {}

    def run():
        centre, radius = op(c, r, w, b, mask, relu_in=relu_in, **geometry)
        if backward:
            (centre.sum() + radius.sum()).backward()
            for t in leaves:
                t.grad = None
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/pruned_layers_cpu.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    fns = {}
    for name, spec, in_shape, relu_in in LAYERS:
        dense, compressed = ((ops.interval_conv2d, sparse.interval_conv2d) if in_shape
                             else (ops.interval_linear, sparse.interval_linear))
        for what, backward in (("fwd", False), ("fwd_bwd", True)):
            for path, op in (("dense", dense), ("sparse", compressed)):
                fns[f"{name} {what} {path}"] = layer_fn(op, spec, in_shape, relu_in, args.batch,
                                                        args.sparsity, backward)
    ms = {k: t * 1e3 for k, t in timeit(fns, torch.device("cpu"), args.repeats).items()}
    ratios = {k.replace(" dense", ""): ms[k] / ms[k.replace(" dense", " sparse")]
              for k in ms if k.endswith(" dense")}
    result = {"sparsity": args.sparsity, "batch": args.batch, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine(),
              "ms": ms, "dense_over_sparse": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in ratios.items():
        print(f"{k:16s} dense {ms[k + ' dense']:8.2f} ms  sparse {ms[k + ' sparse']:8.2f} ms  {v:5.2f}x")
    return result


if __name__ == "__main__":
    main()
