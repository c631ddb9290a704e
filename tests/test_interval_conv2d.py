"""interval_conv2d: kernel against reference twin, opcheck, gradcheck, soundness, bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.ops import (DEVICES, assert_sound, check_engine_entry, check_radius_flag,
                              compare_with_reference, make_box)
from robprune_fast import ops, reference

OPTIONS = [dict(relu_in=r, out_bounds=o) for r in (False, True) for o in (False, True)]

# (batch, in_ch, out_ch, hw, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (1, 3, 5, 7, 3, 1, 1, 1, 1),
    (128, 3, 16, 8, 4, 2, 1, 1, 1),
    (2, 6, 9, 9, 3, 2, 0, 1, 3),
    (3, 4, 4, 10, 3, 1, 2, 2, 4),
    (2, 5, 7, (9, 6), (3, 2), (2, 1), (1, 0), 1, 1),
]


def conv_inputs(batch, in_ch, out_ch, hw, kernel, groups, dtype, device, bias=True, mask=None):
    hw = (hw, hw) if isinstance(hw, int) else hw
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    center, radius = make_box((batch, in_ch) + hw, dtype, device)
    weight = torch.randn(out_ch, in_ch // groups, *kernel, dtype=dtype, device=device) * 0.3
    b = torch.randn(out_ch, dtype=dtype, device=device) if bias else None
    shape = weight.shape
    masks = {None: None, "random": (torch.rand(shape, device=device) > 0.5).to(dtype),
             "zeros": torch.zeros(shape, dtype=dtype, device=device),
             "ones": torch.ones(shape, dtype=dtype, device=device)}
    return dict(center=center, radius=radius, weight=weight, bias=b, mask=masks[mask])


def geometry(stride, padding, dilation, groups):
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("mask", [None, "random"])
def test_matches_reference(device, dtype, options, geo, mask):
    batch, cin, cout, hw, k, stride, padding, dilation, groups = geo
    inputs = conv_inputs(batch, cin, cout, hw, k, groups, dtype, device, mask=mask)
    compare_with_reference("interval_conv2d", inputs, {**options, **geometry(stride, padding, dilation, groups)}, dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("mask", ["zeros", "ones"])
@pytest.mark.parametrize("bias", [True, False])
def test_extreme_masks(device, mask, bias):
    inputs = conv_inputs(4, 3, 6, 8, 3, 1, torch.float32, device, bias=bias, mask=mask)
    compare_with_reference("interval_conv2d", inputs, dict(relu_in=True, out_bounds=True, padding=1), torch.float32)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
def test_memory_layouts(device, layout):
    inputs = conv_inputs(5, 4, 6, 9, 3, 1, torch.float32, device, mask="random")
    c, r = inputs["center"], inputs["radius"]
    if layout == "channels_last":
        c, r = c.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    elif layout == "mixed":  # centre channels_last, radius not
        c = c.to(memory_format=torch.channels_last)
    else:  # non-contiguous views
        c = torch.randn(5, 4, 9, 18, device=device)[..., ::2]
        r = torch.rand(5, 9, 9, 4, device=device).permute(0, 3, 1, 2)
    inputs.update(center=c, radius=r)
    compare_with_reference("interval_conv2d", inputs, dict(relu_in=True, out_bounds=True, stride=2, padding=1), torch.float32)
    if layout == "channels_last":
        out, _ = ops.interval_conv2d(**inputs, relu_in=True)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(channels_last, device):
    for options in OPTIONS:
        inputs = conv_inputs(2, 4, 6, 7, 3, 2, torch.float32, device, mask="random")
        if channels_last:
            for k in ("center", "radius"):
                inputs[k] = inputs[k].to(memory_format=torch.channels_last)
        args = [inputs[k].requires_grad_(True) for k in ("center", "radius", "weight", "bias", "mask")]
        torch.library.opcheck(torch.ops.robprune_fast.interval_conv2d,
                              (*args, None, [2, 1], [1, 0], [1, 1], 2, options["relu_in"], options["out_bounds"]))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_gradcheck_float64(options):
    inputs = conv_inputs(2, 2, 3, 5, 3, 1, torch.float64, "cpu")
    inputs["radius"] = inputs["radius"] + 0.1  # gradcheck's perturbations must keep radius >= 0
    inputs["mask"] = torch.rand_like(inputs["weight"]) + 0.5  # away from |w m|'s kink at 0
    tensors = [inputs[k].requires_grad_(True) for k in ("center", "radius", "weight", "bias", "mask")]
    fn = lambda c, r, w, b, m: ops.interval_conv2d(c, r, w, b, m, stride=2, padding=1, **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu_in", [False, True])
def test_sound(dtype, relu_in):
    torch.manual_seed(0)
    inputs = conv_inputs(16, 4, 8, 8, 3, 2, dtype, "cpu", mask="random")
    geo = geometry(2, 1, 1, 2)
    layer = dict(op="interval_conv2d", apply=lambda x, w, b: F.conv2d(x, w, b, **geo))
    assert_sound(layer, **inputs, options=dict(relu_in=relu_in, **geo))


@pytest.mark.parametrize("change,match", [
    (dict(center=torch.randn(3, 4, 8), radius=torch.rand(3, 4, 8)), "center must be 4-D"),
    (dict(weight=torch.randn(2, 3, 3, 3)), "weight expects in_channels"),
    (dict(mask=torch.ones(2, 4, 3, 1)), "mask must have the shape of weight"),
    (dict(stride=0), "stride must be"),
    (dict(stride=(1, 2, 3)), "stride must be"),
    (dict(groups=3), "weight expects in_channels"),
    (dict(padding=-1), "padding must be"),
    (dict(radius=torch.rand(2, 4, 8, 8, dtype=torch.float64)), "radius must have the dtype of center"),
    (dict(weight=torch.randn(2, 4, 3, 3, device="meta")), "weight must be on the device of center"),
])
def test_bad_input(change, match):
    args = dict(center=torch.randn(2, 4, 8, 8), radius=torch.rand(2, 4, 8, 8),
                weight=torch.randn(2, 4, 3, 3), mask=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.interval_conv2d(**args)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_engine_entry(options):
    t = conv_inputs(2, 4, 6, 7, 3, 2, torch.float32, "cpu", mask="random")
    tensors = [t[k] for k in ("center", "radius", "weight", "bias", "mask")]
    flags = [options["relu_in"], options["out_bounds"]]
    args = tensors + [2, 1, 1, 2] + flags
    private = tensors + [[2, 2], [1, 1], [1, 1], 2] + flags
    bad = private[:5] + [[0, 2]] + private[6:]
    check_engine_entry("interval_conv2d", args, private, bad, "stride must be two positive ints")


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("relu_in", [False, True])
def test_check_radius_flag(device, relu_in):
    t = conv_inputs(2, 4, 6, 7, 3, 2, torch.float32, device, mask="random")
    tensors = [t[k] for k in ("center", "radius", "weight", "bias", "mask")]
    bad = [t["center"], -t["radius"] - 1, *tensors[2:]]
    rest = [None, [2, 2], [1, 1], [1, 1], 2, relu_in, False]
    check_radius_flag(torch.ops.robprune_fast.interval_conv2d, tensors + rest, bad + rest)


@pytest.mark.parametrize("relu_in", [False, True])
def test_input_gradient_alone(relu_in):
    """Frozen weights (attacks on the bounds): the backward skips the weight gradient and the
    ReLU'd box it would need, and the input gradients still equal the twin's."""
    torch.manual_seed(3)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    center0, radius0 = make_box((4, 3, 8, 8), torch.float64, "cpu")
    grads = []
    for lib in (ops, reference):
        center, radius = center0.clone().requires_grad_(True), radius0.clone().requires_grad_(True)
        lower, upper = lib.interval_conv2d(center, radius, weight, None, None, 2, 1,
                                           relu_in=relu_in, out_bounds=True)
        (lower.sum() - upper.pow(2).sum()).backward()
        grads.append((center.grad, radius.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
