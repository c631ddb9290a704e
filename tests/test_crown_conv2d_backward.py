"""crown_conv2d_backward: kernel against reference twin (values and gradients, mask included)
over strides, padding, dilation, groups and input sizes that need output padding; opcheck,
gradcheck, exactness of the step, bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.ops import DEVICES, MASKS, compare_with_reference, make_mask
from robprune_fast import ops

# (leading dims of A, c_in, c_out, kernel, input_size, stride, padding, dilation, groups)
GEOMETRIES = [
    ((1, 1), 3, 4, 3, (8, 8), 1, 1, 1, 1),
    ((4, 9), 5, 6, 4, (9, 8), 2, 1, 1, 1),    # odd size, stride 2: output padding 1 on H
    ((2, 3), 4, 6, 3, (7, 10), 2, 0, 2, 2),   # dilation and groups
    ((3,), 3, 3, 1, (5, 5), 1, 0, 1, 3),      # depthwise 1x1
    ((), 2, 3, 3, (6, 7), (2, 1), (0, 1), 1, 1),
    ((0, 3), 3, 4, 3, (6, 6), 1, 1, 1, 1),    # no rows
]


def conv_inputs(lead, c_in, c_out, kernel, input_size, stride, padding, dilation, groups, dtype,
                device, bias=True, mask="none"):
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, dtype=dtype, device=device)
    h = torch.zeros(1, c_in, *input_size, dtype=dtype, device=device)
    out_size = F.conv2d(h, weight, None, stride, padding, dilation, groups).shape[-2:]
    return dict(A=torch.randn(*lead, c_out, *out_size, dtype=dtype, device=device), weight=weight,
                bias=torch.randn(c_out, dtype=dtype, device=device) if bias else None,
                mask=make_mask(mask, weight))


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:2])))
def test_matches_reference(device, dtype, mask, geometry):
    lead, c_in, c_out, kernel, input_size, stride, padding, dilation, groups = geometry
    tensors = conv_inputs(*geometry, dtype, device, bias=mask != "ones", mask=mask)
    options = dict(input_size=input_size, stride=stride, padding=padding, dilation=dilation,
                   groups=groups)
    compare_with_reference("crown_conv2d_backward", tensors, options, dtype)


@pytest.mark.parametrize("layout", ["channels_last_A", "channels_last_weight", "transposed_A",
                                    "neurons_last_5d_A"])
def test_memory_layouts(layout):
    tensors = conv_inputs((6,), 4, 8, 3, (9, 9), 2, 1, 1, 1, torch.float32, "cpu", mask="random")
    if layout == "channels_last_A":
        tensors["A"] = tensors["A"].contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_weight":
        tensors["weight"] = tensors["weight"].contiguous(memory_format=torch.channels_last)
    elif layout == "transposed_A":
        tensors["A"] = tensors["A"].view(2, 3, 8, 5, 5).transpose(0, 1)
    else:  # (B, S, C, H, W) with the channels innermost, as the bound engine passes it
        tensors["A"] = tensors["A"].view(2, 3, 8, 5, 5).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    options = dict(input_size=(9, 9), stride=2, padding=1)
    compare_with_reference("crown_conv2d_backward", tensors, options, torch.float32)
    new_A, _ = ops.crown_conv2d_backward(**tensors, **options)
    if layout == "channels_last_A":  # the step keeps A's layout
        assert new_A.is_contiguous(memory_format=torch.channels_last)
    if layout == "neurons_last_5d_A":
        assert new_A.permute(0, 1, 3, 4, 2).is_contiguous()


@pytest.mark.parametrize("geometry", GEOMETRIES[1:3], ids=["stride2", "dilation_groups"])
def test_step_is_exact(geometry):
    """sum A * conv(h) == sum A' * h + term for any h: the step loses nothing."""
    lead, c_in, c_out, kernel, input_size, stride, padding, dilation, groups = geometry
    t = conv_inputs(*geometry, torch.float64, "cpu", mask="random")
    new_A, term = ops.crown_conv2d_backward(t["A"], t["weight"], t["bias"], t["mask"], input_size,
                                            stride, padding, dilation, groups)
    h = torch.randn(lead[0], c_in, *input_size, dtype=torch.float64)
    out = F.conv2d(h, t["weight"] * t["mask"], t["bias"], stride, padding, dilation, groups)
    direct = (t["A"] * out.unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close((new_A * h.unsqueeze(1)).flatten(2).sum(-1) + term, direct)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    t = conv_inputs((2, 3), 4, 6, 3, (7, 8), 2, 1, 1, 2, torch.float32, device, mask="random")
    args = tuple(v.requires_grad_(True) for v in t.values())
    torch.library.opcheck(torch.ops.robprune_fast.crown_conv2d_backward,
                          (*args, None, [7, 8], [2, 2], [1, 1], [1, 1], 2))


def test_gradcheck_float64():
    torch.manual_seed(1)
    t = conv_inputs((2,), 2, 3, 3, (6, 5), 2, 1, 1, 1, torch.float64, "cpu", mask="random")
    tensors = [v.requires_grad_(True) for v in t.values()]
    assert torch.autograd.gradcheck(
        lambda *x: ops.crown_conv2d_backward(*x, (6, 5), 2, 1), tensors)


def good_args():
    t = conv_inputs((2,), 4, 6, 3, (8, 8), 2, 1, 1, 1, torch.float32, "cpu")
    return dict(**t, input_size=(8, 8), stride=2, padding=1, dilation=1, groups=1)


@pytest.mark.parametrize("change,match", [
    (dict(A=torch.randn(2, 5, 4, 4)), r"A must have shape \(\*, C_out, H_out, W_out\)"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), "weight must have the dtype of A"),
    (dict(mask=torch.ones(6, 4, 3, 1)), "mask must have the shape of weight"),
    (dict(input_size=(0, 8)), "input_size must be two positive ints"),
    (dict(groups=0), "groups must be a positive int"),
    (dict(stride=(2, 0)), "stride must be two positive ints"),
    (dict(stride=1.0), "stride must be an int or a pair of ints"),
    (dict(padding=True), "padding must be an int or a pair of ints"),
])
def test_bad_input_python(change, match):
    args = good_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.crown_conv2d_backward(**args)


@pytest.mark.parametrize("change,match", [
    (dict(input_size=(12, 8)), "A's spatial size .* must be the layer's output size"),
    (dict(input_size=(1, 1), padding=0), "input_size's spatial size .* is smaller than the dilated kernel"),
    (dict(groups=4), r"weight.size\(0\) \(out_channels = 6\) must be divisible by groups = 4"),
])
def test_bad_input_cpp(change, match):
    args = good_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.crown_conv2d_backward(**args)
