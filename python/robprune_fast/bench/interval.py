"""The interval section: IBP through each layer of cnn_large and through the whole network (fused,
reference and plain), and CROWN's fused steps against their twins (see the package docstring)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops, reference
from ..bounds.crown_steps import neurons_last
from ..models import Normalize, build
from .tables import markdown
from .timing import matmul_peak, timeit


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
    peak = result["matmul_gflops"]
    entries = [(row["layer"], row["plain_gflop"], row) for row in result["layers"]]
    entries.append(("whole cnn_large", result["network_gflop"], result["network"]))
    layer_rows = []
    for name, gflop, row in entries:
        for mode in ("forward", "forward+backward"):
            t = row[mode]
            # FLOPs of an interval pass: 2x plain forward; backward adds 2x that again.
            rate = 2 * gflop * (3 if mode == "forward+backward" else 1) / t["fused"]
            layer_rows.append([name, mode, f"{t['fused'] * 1e3:.2f}", f"{t['reference'] * 1e3:.2f}",
                               f"{t['plain'] * 1e3:.2f}", f"{t['fused'] / t['plain']:.2f}x",
                               f"{t['reference'] / t['fused']:.2f}x", f"{rate:.0f}", f"{100 * rate / peak:.0f}%"])
    crown_rows = [[row["op"], str(tuple(row["shape"])), row["layout"], mode, f"{row[mode]['fused'] * 1e3:.2f}",
                   f"{row[mode]['reference'] * 1e3:.2f}", f"{row[mode]['reference'] / row[mode]['fused']:.2f}x"]
                  for row in result["crown_steps"] for mode in ("forward", "forward+backward")]
    return "\n".join([
        f"device: {result['device']}; batch {result['batch']}; {result['memory_format']}; matmul peak "
        f"{peak:.0f} GFLOP/s; torch {result['torch']}; threads {result['threads']}", "",
        *markdown(["layer", "mode", "fused ms", "reference ms", "plain ms", "fused / plain", "reference / fused",
                   "fused GFLOP/s", "% of peak"], "llrrrrrrr", layer_rows),
        "", "CROWN's fused steps (one side of the walk, 9 margin rows per input):", "",
        *markdown(["op", "A shape", "A layout", "mode", "fused ms", "reference ms", "reference / fused"], "llllrrr",
                  crown_rows)])


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
