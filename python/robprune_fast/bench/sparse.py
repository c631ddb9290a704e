"""The sparse section: the compressed path of the masked layers against the dense layer, torch's
CSR matmul and the dense fused interval op (see the package docstring)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .. import nn as rnn
from .. import ops
from ..ops import crossover, sparse
from ..ops.sparse_index import pack_mask
from .tables import markdown
from .timing import timeit


SPARSITIES = (0.5, 0.9, 0.95, 0.99)


def sparse_layers(batch, device):
    """(name, op, x, weight, bias, conv options) of the compressed path's two benchmark layers."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    return [("linear 4096->512", "linear", rand(batch, 4096), rand(512, 4096) / 64, rand(512), {}),
            ("conv 32->64 3x3 32x32", "conv2d", rand(batch, 32, 32, 32), rand(64, 32, 3, 3) / 17, rand(64),
             dict(stride=1, padding=1))]


def layer_variants(op, x, weight, bias, mask, options, backward):
    """The masked layer four ways: dense (F.linear / F.conv2d on weight * mask), the compressed
    path of the masked layer (its weight a dense parameter, the kept values gathered per call
    as in training), the compressed layer whose parameter is the kept values
    (nn.CompressedLinear / CompressedConv2d: nothing gathered, no dense weight gradient), and
    (linear) torch's CSR matmul on the kept values; each from fresh leaves, backward into x,
    the weight (or the kept values) and bias, whose gradients are dropped before each call as a
    training step's zero_grad(set_to_none=True) does (so no variant pays for accumulating into
    the last call's)."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, weight, bias)]
    index = pack_mask(mask)
    crow, col = index.row_ptr.long(), index.col.long()
    layer = _compressed_layer(op, weight, bias, mask, options)

    def run(fn, params=leaves):
        def step():
            for leaf in params:
                leaf.grad = None
            with torch.set_grad_enabled(backward):
                y = fn(*params)
                if backward:
                    y.backward(torch.ones_like(y))
        return step

    def torch_csr(x, w, b):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            csr = torch.sparse_csr_tensor(crow, col, torch.take(w, index.flat_index), size=w.shape,
                                          check_invariants=False)
        return torch.sparse.mm(csr, x.t()).t() + b

    kept = [leaves[0], layer.weight_values.requires_grad_(backward), layer.bias.requires_grad_(backward)]
    if op == "linear":
        fns = dict(dense=run(lambda x, w, b: F.linear(x, w * mask, b)),
                   sparse=run(lambda x, w, b: ops.masked_linear(x, w, b, mask, path="sparse")),
                   kept_values=run(lambda x, v, b: layer(x), kept),
                   torch_csr=run(torch_csr))
    else:
        fns = dict(dense=run(lambda x, w, b: F.conv2d(x, w * mask, b, **options)),
                   sparse=run(lambda x, w, b: ops.masked_conv2d(x, w, b, mask, **options, path="sparse")),
                   kept_values=run(lambda x, v, b: layer(x), kept))
    return fns


def _compressed_layer(op, weight, bias, mask, options):
    """nn.CompressedLinear / CompressedConv2d holding weight's kept values (mask's ones)."""
    if op == "linear":
        masked = rnn.MaskedLinear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    else:
        masked = rnn.MaskedConv2d(weight.shape[1], weight.shape[0], weight.shape[2:], **options,
                                  device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        masked.weight.copy_(weight)
        masked.bias.copy_(bias)
        masked.set_mask(mask)
    return rnn.compress(torch.nn.Sequential(masked))[0]


def interval_variants(op, x, weight, bias, mask, options, eps=2 / 255):
    """The interval forward (ReLU on the input box, bounds out) of the masked layer: the dense
    fused op against the compressed path, inside ops.weight_cache() (weights fixed)."""
    c, r = x, torch.full_like(x, eps)
    if op == "linear":
        call = lambda lib: lib.interval_linear(c, r, weight, bias, mask, relu_in=True, out_bounds=True)
    else:
        call = lambda lib: lib.interval_conv2d(c, r, weight, bias, mask, **options, relu_in=True, out_bounds=True)
    return dict(dense_fused=lambda: call(ops), sparse=lambda: call(sparse))


def bench_sparse(batch, device, repeats):
    """Rows of the sparse section: per layer and sparsity, forward and forward + backward times
    of every variant, the interval forward, and the path path="auto" takes."""
    rows = []
    g = torch.Generator().manual_seed(1)
    for name, op, x, weight, bias, options in sparse_layers(batch, device):
        geometry = tuple(ops.checks.conv_geometry(options["stride"], options["padding"], 1, 1)) if options else ()
        threshold = crossover.crossover(op, tuple(x.shape), tuple(weight.shape), geometry, x.dtype, x.device)
        for sparsity in SPARSITIES:
            mask = (torch.rand(weight.shape, generator=g) >= sparsity).to(weight)
            density = float(mask.mean())
            row = dict(layer=name, sparsity=sparsity, density=density, crossover=threshold,
                       auto="sparse" if density < threshold else "dense")
            for mode in ("forward", "forward+backward"):
                row[mode] = timeit(layer_variants(op, x, weight, bias, mask, options, mode == "forward+backward"),
                                   device, repeats)
            with ops.weight_cache(), torch.no_grad():
                row["interval forward"] = timeit(interval_variants(op, x, weight, bias, mask, options), device, repeats)
            rows.append(row)
    return rows


def format_sparse_table(result) -> str:
    rows = []
    for row in result["sparse"]:
        for mode in ("forward", "forward+backward", "interval forward"):
            t = row[mode]
            dense, ours, csr = t.get("dense", t.get("dense_fused")), t["sparse"], t.get("torch_csr")
            kept = t.get("kept_values")
            optional = lambda v, f: "" if v is None else f(v)
            rows.append([row["layer"], f"{100 * row['sparsity']:.0f}%", mode, f"{dense * 1e3:.2f}", f"{ours * 1e3:.2f}",
                         optional(kept, lambda v: f"{v * 1e3:.2f}"), optional(csr, lambda v: f"{v * 1e3:.2f}"),
                         f"{dense / ours:.2f}x", optional(kept, lambda v: f"{dense / v:.2f}x"),
                         optional(csr, lambda v: f"{v / ours:.2f}x"), row["auto"] if mode != "interval forward" else ""])
    crossovers = ", ".join(f"{row['layer']} {row['crossover']:.3f}" for row in result["sparse"]
                           if row["sparsity"] == result["sparse"][0]["sparsity"])
    return "\n".join([
        f"Compressed path: batch {result['batch']}, {result['threads']} threads; ms (median of "
        f"{result['repeats']} interleaved repetitions)", "",
        *markdown(["layer", "sparsity", "mode", "dense", "sparse", "kept values", "torch CSR", "dense / sparse",
                   "dense / kept values", "CSR / sparse", "auto"], "lrlrrrrrrrl", rows),
        "", f"auto's measured crossover density (sparse below it): {crossovers}",
        "kept values: the compressed layer whose parameter is the kept weights (nn.CompressedLinear / "
        "CompressedConv2d).",
        "interval forward: dense = the fused dense interval op (ops.interval_*), both inside weight_cache()."])
