"""Inference of a pruned linear layer at batch 1 and 2 (a deployed model answering one request):
the dense layer (the zeros baked in, as `strip` leaves it) against the masked layer's compressed
path and the compressed layer, and the interval forward (verifying one input: the dense fused
op against the compressed one), without gradients.

    python benchmarks/small_batch.py --repeats 201

Below kRowsInPlace samples (csrc/sparse/sparse_planes.h) the compressed kernels read each
sample's row in place instead of transposing the batch. Variants take turns in every repetition
(bench.timeit); medians in microseconds and the ratios to dense, as JSON.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from robprune_fast import nn as rnn
from robprune_fast import ops
from robprune_fast.bench import machine, timeit, write_result


def variants(batch, sparsity, generator):
    masked = rnn.MaskedLinear(4096, 512, path="sparse")
    masked.set_mask(torch.rand(512, 4096, generator=generator) >= sparsity)
    compressed = rnn.compress(torch.nn.Sequential(copy.deepcopy(masked)))[0]
    x = torch.randn(batch, 4096, generator=generator)
    r = torch.full_like(x, 2 / 255)
    weight, bias, mask = masked.weight, masked.bias, masked.weight_mask
    stripped = weight * mask  # a deployed dense model holds its weights with the zeros in
    return {
        "dense": lambda: F.linear(x, stripped, bias),
        "masked": lambda: masked(x),
        "compressed": lambda: compressed(x),
        "interval_dense": lambda: ops.interval_linear(x, r, weight, bias, mask, relu_in=True, out_bounds=True),
        "interval_sparse": lambda: ops.sparse.interval_linear(x, r, weight, bias, mask, relu_in=True, out_bounds=True),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=201)
    p.add_argument("--out", default="benchmarks/results/small_batch_cpu.json")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad(), ops.weight_cache():
        for batch in (1, 2):
            for sparsity in (0.9, 0.99):
                t = timeit(variants(batch, sparsity, g), torch.device("cpu"), args.repeats)
                us = {k: v * 1e6 for k, v in t.items()}
                rows.append({"batch": batch, "sparsity": sparsity, "us": us,
                             "dense_over": {k: us["dense"] / us[k] for k in ("masked", "compressed")}
                             | {"interval_sparse": us["interval_dense"] / us["interval_sparse"]}})
    result = {"layer": "linear 4096->512", "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": machine(), "rows": rows}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
