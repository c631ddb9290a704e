"""Kernel microbenchmarks: python -m robprune_fast.bench [--device cuda] [--json out.json]

Times interval bound propagation (IBP) through each layer of cnn_large and through the whole
network, three ways, in one run so only ratios are compared (and, last, CROWN's fused steps
through a ReLU, a conv and a linear layer against their twins):

- fused:     robprune_fast.ops (the compiled kernels),
- reference: robprune_fast.reference (separate conv/matmul calls for centre and radius, abs and
             the elementwise steps as plain torch ops: what one writes without this package),
- plain:     the ordinary, non-interval layer (conv/linear + ReLU), the floor's unit: an
             interval pass does twice its FLOPs, so 2x plain is the floor.

Forward runs inside ops.weight_cache() (weights fixed, as in evaluation and verification);
forward+backward runs without it (in training the weights change every step). GFLOP/s are
counted on the plain layer's FLOPs (x2 for interval passes) and set against the machine's
measured float32 matmul rate.

The sparse section (``--sections sparse``) times the compressed path of the masked layers
(``ops.masked_linear`` / ``masked_conv2d`` with path="sparse") on a linear 4096 -> 512 and a
conv 32 -> 64 3x3 on 32x32 at several sparsities, against the dense layer on W * M and, for the
linear layer, torch's CSR matmul; and the interval forward of the compressed path against the
dense fused interval op. It also gives the crossover density path="auto" measured (ops.crossover).

One module per job: ``timing`` (interleaved repetitions, medians, the machine), ``interval``
(the interval section), ``sparse`` (the sparse section); this file holds the command.
"""
from __future__ import annotations

import argparse
import json

import torch

from .. import build_info
from .interval import bench_ibp, format_table
from .sparse import SPARSITIES, bench_sparse, format_sparse_table
from .timing import machine, matmul_peak, timeit, turn_orders, write_result

__all__ = ["SPARSITIES", "machine", "main", "matmul_peak", "timeit", "turn_orders", "write_result"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m robprune_fast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true",
                        help="run every variant (plain included) in channels_last memory format")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--sections", nargs="+", choices=["ibp", "sparse"], default=["ibp", "sparse"],
                        help="what to run: ibp (interval bounds through cnn_large and CROWN's steps), "
                             "sparse (the compressed path of the masked layers)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be positive")
    device = torch.device(args.device)
    result = dict(device=machine(device),
                  batch=args.batch, repeats=args.repeats, torch=torch.__version__, threads=torch.get_num_threads(),
                  build=build_info())
    if "ibp" in args.sections:
        result.update(bench_ibp(args, device))
        print(format_table(result))
    if "sparse" in args.sections:
        result["sparse"] = bench_sparse(args.batch, device, args.repeats)
        print(format_sparse_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
