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
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import build_info, ops, reference
from .bounds.crown_steps import neurons_last
from .models import Normalize, build
from .ops import crossover, sparse
from .ops.sparse_index import pack_mask


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def turn_orders(names: list, repeats: int) -> list[list]:
    """The order of the variants in each repetition: a fresh permutation every time (seeded, so
    runs repeat), so that no variant always runs right after the same other one. A variant that
    follows one with large tensors finds cold caches and a freshly trimmed heap; rotating one
    fixed order would not help, as every variant would keep its predecessor."""
    rng = random.Random(0)
    return [rng.sample(names, len(names)) for _ in range(repeats)]


def timeit(fns: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Median wall time in seconds of each of fns' callables. The variants take turns within
    every repetition, so a drift in the machine's speed (these shared machines swing by 1.5x)
    hits them alike and their ratios stay meaningful; the turn order changes from one
    repetition to the next (turn_orders)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for order in turn_orders(list(fns), repeats):
        for name in order:
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(device, repeats: int) -> float:
    """Measured float32 GEMM rate (GFLOP/s) on square matrices: the roofline's compute roof."""
    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timeit({"mm": lambda: torch.mm(a, b)}, device, repeats)["mm"] / 1e9


def layer_flops(layer: nn.Module, y_shape) -> int:
    """Multiply-adds x 2 of the plain layer."""
    if isinstance(layer, nn.Conv2d):
        k = layer.weight[0].numel()  # in_channels / groups * kh * kw
        return 2 * k * y_shape.numel()
    return 2 * layer.in_features * y_shape.numel()


def interval_step(lib, layer, c, r, relu_in: bool, out_bounds: bool):
    """One interval layer through lib (ops or reference)."""
    if isinstance(layer, nn.Conv2d):
        return lib.interval_conv2d(c, r, layer.weight, layer.bias, None, layer.stride, layer.padding,
                                   layer.dilation, layer.groups, relu_in=relu_in, out_bounds=out_bounds)
    return lib.interval_linear(c, r, layer.weight, layer.bias, None, relu_in=relu_in, out_bounds=out_bounds)


def ibp_network(lib, model: nn.Sequential, x: torch.Tensor, eps: float, on_layer=None):
    """IBP bounds (lower, upper) of model's logits over the eps-ball around x clipped to
    [0, 1], through lib (ops or reference), each ReLU fused into the next layer as relu_in.
    on_layer(name, layer, centre, radius, relu_in) sees every affine layer's input box."""
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    c, r = (upper + lower) / 2, (upper - lower) / 2
    relu_pending = False
    children = list(model.named_children())
    for i, (name, layer) in enumerate(children):
        if isinstance(layer, Normalize):
            c, r = (c - layer.mean) / layer.std, r / layer.std
        elif isinstance(layer, nn.ReLU):
            relu_pending = True
        elif isinstance(layer, nn.Flatten):
            c, r = c.flatten(1), r.flatten(1)
        else:
            if on_layer is not None:
                on_layer(f"{name}:{type(layer).__name__}", layer, c, r, relu_pending)
            c, r = interval_step(lib, layer, c, r, relu_pending, out_bounds=i == len(children) - 1)
            relu_pending = False
    return c, r


def bench_layers(model, x, device, repeats, eps=2 / 255):
    """Per-layer rows: each affine layer of model timed on the input box it sees in IBP."""
    inputs = []
    with torch.no_grad():
        ibp_network(reference, model, x, eps, on_layer=lambda *seen: inputs.append(seen))
    rows = []
    for name, layer, c_in, r_in, relu_in in inputs:
        with torch.no_grad():
            y = layer(torch.relu(c_in) if relu_in else c_in)
        row = dict(layer=name, shape=list(c_in.shape), plain_gflop=layer_flops(layer, y.shape) / 1e9)
        for mode in ("forward", "forward+backward"):
            row[mode] = time_variants(layer, c_in, r_in, relu_in, device, repeats, mode)
        rows.append(row)
    return rows


def time_variants(layer, c, r, relu_in, device, repeats, mode):
    backward = mode == "forward+backward"
    grad_ctx = torch.enable_grad if backward else torch.no_grad

    def interval(lib):
        def run():
            with grad_ctx():
                a, b = interval_step(lib, layer, c, r, relu_in, out_bounds=True)
                if backward:
                    (b.sum() - a.sum()).backward()
        return run

    def plain():
        with grad_ctx():
            y = layer(torch.relu(c) if relu_in else c)
            if backward:
                y.sum().backward()

    cache = ops.weight_cache() if not backward else contextlib.nullcontext()
    with cache:
        times = timeit(dict(fused=interval(ops), reference=interval(reference), plain=plain), device, repeats)
    layer.zero_grad(set_to_none=True)
    return times


def bench_network(model, x, device, repeats, eps=2 / 255):
    rows = {}
    for mode in ("forward", "forward+backward"):
        backward = mode == "forward+backward"
        grad_ctx = torch.enable_grad if backward else torch.no_grad

        def interval(lib):
            def run():
                with grad_ctx():
                    lower, upper = ibp_network(lib, model, x, eps)
                    if backward:
                        (upper.sum() - lower.sum()).backward()
            return run

        def plain():
            with grad_ctx():
                y = model(x)
                if backward:
                    y.sum().backward()

        with ops.weight_cache() if not backward else contextlib.nullcontext():
            rows[mode] = timeit(dict(fused=interval(ops), reference=interval(reference), plain=plain),
                                device, repeats)
        model.zero_grad(set_to_none=True)
    return rows


def check_agreement(model, x):
    """The fused and reference networks must agree before their times mean anything."""
    with torch.no_grad():
        fused = ibp_network(ops, model, x, 2 / 255)
        ref = ibp_network(reference, model, x, 2 / 255)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def crown_steps(batch, device, specs=9):
    """CROWN's fused steps on the A that CROWN-IBP carries through cnn_large (margin rows: 9 per
    input), one side of the walk: the ReLU after the second conv, the second conv itself (A at
    its output, 32 x 16 x 16; NCHW and channels innermost), and the first linear layer (A at its
    output, 512)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    lower = rand(batch, 32, 16, 16)
    relu = ("crown_relu_backward", (rand(batch, specs, 32, 16, 16), lower, lower + rand(*lower.shape).abs()),
            dict(upper_side=False))
    conv = ("crown_conv2d_backward", (rand(batch, specs, 32, 16, 16), rand(32, 32, 4, 4), rand(32), None),
            dict(input_size=(32, 32), stride=2, padding=1))
    # The same conv step on A laid out as the bound engine passes it on the CPU (channels
    # innermost, bound_steps.neurons_last): the layout, not the op, is what speeds it up.
    conv_last = (conv[0], (neurons_last(conv[1][0]), *conv[1][1:]), conv[2])
    linear = ("crown_linear_backward", (rand(batch, specs, 512), rand(512, 4096), rand(512), None), {})
    return [relu, conv, conv_last, linear]


def bench_crown_steps(batch, device, repeats, specs=9):
    """Each fused CROWN step against its twin (forward, and forward + backward into every input)."""
    rows = []
    for name, tensors, options in crown_steps(batch, device, specs):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
        row = dict(op=name, shape=list(tensors[0].shape),
                   layout="channels innermost" if not tensors[0].is_contiguous() else "contiguous")
        for mode in ("forward", "forward+backward"):
            def run(lib, backward=mode == "forward+backward"):
                def step():
                    with torch.enable_grad() if backward else torch.no_grad():
                        out, bias = getattr(lib, name)(*leaves, **options)
                        if backward:
                            (out.sum() + bias.sum()).backward()
                return step
            row[mode] = timeit(dict(fused=run(ops), reference=run(reference)), device, repeats)
        rows.append(row)
    return rows


def format_table(result) -> str:
    lines = [f"device: {result['device']}; batch {result['batch']}; {result['memory_format']}; matmul peak "
             f"{result['matmul_gflops']:.0f} GFLOP/s; torch {result['torch']}; threads {result['threads']}", "",
             "| layer | mode | fused ms | reference ms | plain ms | fused / plain | reference / fused | fused GFLOP/s | % of peak |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    peak = result["matmul_gflops"]
    entries = [(row["layer"], row["plain_gflop"], row) for row in result["layers"]]
    entries.append(("whole cnn_large", result["network_gflop"], result["network"]))
    for name, gflop, row in entries:
        for mode in ("forward", "forward+backward"):
            t = row[mode]
            # FLOPs of an interval pass: 2x plain forward; backward adds 2x that again.
            work = 2 * gflop * (3 if mode == "forward+backward" else 1)
            rate = work / t["fused"]
            lines.append(f"| {name} | {mode} | {t['fused'] * 1e3:.2f} | {t['reference'] * 1e3:.2f} | "
                         f"{t['plain'] * 1e3:.2f} | {t['fused'] / t['plain']:.2f}x | "
                         f"{t['reference'] / t['fused']:.2f}x | {rate:.0f} | {100 * rate / peak:.0f}% |")
    lines += ["", "CROWN's fused steps (one side of the walk, 9 margin rows per input):", "",
              "| op | A shape | A layout | mode | fused ms | reference ms | reference / fused |",
              "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for row in result["crown_steps"]:
        for mode in ("forward", "forward+backward"):
            t = row[mode]
            lines.append(f"| {row['op']} | {tuple(row['shape'])} | {row['layout']} | {mode} | {t['fused'] * 1e3:.2f} | "
                         f"{t['reference'] * 1e3:.2f} | {t['reference'] / t['fused']:.2f}x |")
    return "\n".join(lines)


# --- the compressed path of the masked layers ------------------------------------------------------

SPARSITIES = (0.5, 0.9, 0.95, 0.99)


def sparse_layers(batch, device):
    """(name, op, x, weight, bias, conv options) of the compressed path's two benchmark layers."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    return [("linear 4096->512", "linear", rand(batch, 4096), rand(512, 4096) / 64, rand(512), {}),
            ("conv 32->64 3x3 32x32", "conv2d", rand(batch, 32, 32, 32), rand(64, 32, 3, 3) / 17, rand(64),
             dict(stride=1, padding=1))]


def layer_variants(op, x, weight, bias, mask, options, backward):
    """The masked layer three ways: dense (F.linear / F.conv2d on weight * mask), the compressed
    path, and (linear) torch's CSR matmul on the kept values; each from fresh leaves, the weight
    gathered per call as in training, backward into x, weight and bias."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, weight, bias)]
    index = pack_mask(mask)
    crow, col = index.row_ptr.long(), index.col.long()

    def run(fn):
        def step():
            with torch.set_grad_enabled(backward):
                y = fn(*leaves)
                if backward:
                    y.backward(torch.ones_like(y))
        return step

    def torch_csr(x, w, b):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
            csr = torch.sparse_csr_tensor(crow, col, torch.take(w, index.flat_index), size=w.shape,
                                          check_invariants=False)
        return torch.sparse.mm(csr, x.t()).t() + b

    if op == "linear":
        fns = dict(dense=lambda x, w, b: F.linear(x, w * mask, b),
                   sparse=lambda x, w, b: ops.masked_linear(x, w, b, mask, path="sparse"), torch_csr=torch_csr)
    else:
        fns = dict(dense=lambda x, w, b: F.conv2d(x, w * mask, b, **options),
                   sparse=lambda x, w, b: ops.masked_conv2d(x, w, b, mask, **options, path="sparse"))
    return {name: run(fn) for name, fn in fns.items()}


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
    lines = [f"Compressed path: batch {result['batch']}, {result['threads']} threads; ms (median of "
             f"{result['repeats']} interleaved repetitions)", "",
             "| layer | sparsity | mode | dense | sparse | torch CSR | dense / sparse | CSR / sparse | auto |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in result["sparse"]:
        for mode in ("forward", "forward+backward", "interval forward"):
            t = row[mode]
            dense, ours, csr = t.get("dense", t.get("dense_fused")), t["sparse"], t.get("torch_csr")
            csr_ms, csr_ratio = ("", "") if csr is None else (f"{csr * 1e3:.2f}", f"{csr / ours:.2f}x")
            auto = row["auto"] if mode != "interval forward" else ""
            lines.append(f"| {row['layer']} | {100 * row['sparsity']:.0f}% | {mode} | {dense * 1e3:.2f} | "
                         f"{ours * 1e3:.2f} | {csr_ms} | {dense / ours:.2f}x | {csr_ratio} | {auto} |")
    crossovers = {row["layer"]: row["crossover"] for row in result["sparse"]}
    lines += ["", "auto's measured crossover density (sparse below it): " +
              ", ".join(f"{name} {value:.3f}" for name, value in crossovers.items()),
              "interval forward: dense = the fused dense interval op (ops.interval_*), both inside weight_cache()."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
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


def bench_ibp(args, device) -> dict:
    """The interval section: each layer of cnn_large and the whole network, and CROWN's steps."""
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build("cnn_large").to(device, memory_format=layout)
    x = torch.rand(args.batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    check_agreement(model, x)
    layers = bench_layers(model, x, device, args.repeats)
    return dict(memory_format="channels_last" if args.channels_last else "contiguous",
                matmul_gflops=matmul_peak(device, args.repeats), layers=layers,
                network_gflop=sum(row["plain_gflop"] for row in layers),
                network=bench_network(model, x, device, args.repeats),
                crown_steps=bench_crown_steps(args.batch, device, args.repeats))


if __name__ == "__main__":
    main()
