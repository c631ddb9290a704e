"""input_box: kernel against reference twin (values and gradients), opcheck, gradcheck,
soundness of the box it returns, bad input."""
import pytest
import torch

from tests.helpers.ops import DEVICES, SOUND_SLACK, check_engine_entry, compare_with_reference
from robprune_fast import ops


def make_x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype).to(device)
    flat = x.view(-1)
    flat[: flat.numel() // 10] = 0.0   # pixels on the border of [0, 1], where the clip acts
    flat[-(flat.numel() // 10):] = 1.0
    return x


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", ["none", "scale_shift", "negative_scale"])
@pytest.mark.parametrize("shape,eps_kind", [
    ((1, 1, 5, 5), "scalar"), ((8, 3, 7, 6), "scalar"), ((8, 3, 7, 6), "per_element"),
    ((4, 5), "scalar"), ((0, 3, 4, 4), "scalar"), ((2, 3, 4, 4, 2), "per_element"),
])
def test_matches_reference(device, dtype, affine, shape, eps_kind):
    x = make_x(shape, dtype, device)
    eps = (torch.tensor(0.03, dtype=dtype, device=device) if eps_kind == "scalar"
           else torch.rand(shape, dtype=dtype, device=device) * 0.1)
    channels = shape[1]
    scale = shift = None
    if affine != "none":
        scale = torch.rand(channels, dtype=dtype, device=device) + 0.5
        if affine == "negative_scale":
            scale = -scale
        shift = torch.randn(channels, dtype=dtype, device=device)
    tensors = dict(x=x, eps=eps, scale=scale, shift=shift)
    compare_with_reference("input_box", tensors, {}, dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    x = make_x((3, 2, 4, 4), torch.float32, device).requires_grad_(True)
    args = (x, torch.tensor(0.05, device=device, requires_grad=True),
            torch.rand(2, device=device, requires_grad=True),
            torch.randn(2, device=device, requires_grad=True))
    torch.library.opcheck(torch.ops.robprune_fast.input_box, args)


def test_gradcheck_float64():
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)  # no clip
    eps = torch.full_like(x, 0.05).requires_grad_(True)
    scale = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    shift = torch.randn(3, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: ops.input_box(*t), (x, eps, scale, shift))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_box_is_sound(dtype):
    """Every point of the clipped ball, normalised, lies in the box (corners included)."""
    x = make_x((4, 3, 6, 6), dtype, "cpu")
    eps = 0.04
    scale, shift = torch.tensor([2.0, -4.0, 0.5], dtype=dtype), torch.tensor([-1.0, 0.5, 0.0], dtype=dtype)
    c, r = ops.input_box(x, eps, scale, shift)
    view = (1, 3, 1, 1)
    for i in range(32):
        u = torch.rand_like(x) * 2 - 1
        if i % 2:
            u = u.sign()
        point = (x + eps * u).clamp(0, 1) * scale.view(view) + shift.view(view)
        slack = SOUND_SLACK[dtype] * 4
        assert bool(((point - c).abs() <= r + slack).all())


@pytest.mark.parametrize("change,match,error", [
    (dict(x=torch.full((2, 3, 4, 4), 1.5)), r"x must lie in \[0, 1\]", RuntimeError),
    (dict(eps=-0.1), "eps must be >= 0", RuntimeError),
    (dict(eps=torch.ones(5)), "eps must be a number or broadcast to x's shape", ValueError),
    (dict(scale=torch.ones(2)), r"scale must have shape \(C,\) = \(3,\)", ValueError),
    (dict(shift=torch.ones(3, dtype=torch.float64)), "shift must have the dtype of x", TypeError),
    (dict(x=torch.rand(2, 3, 4, 4).half()), "x must be float32 or float64", TypeError),
])
def test_bad_input(change, match, error):
    args = dict(x=torch.rand(2, 3, 4, 4), eps=0.1, scale=torch.ones(3), shift=torch.zeros(3))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.input_box(**args)


@pytest.mark.parametrize("per_pixel", [False, True], ids=["scalar_eps", "per_pixel_eps"])
def test_engine_entry(per_pixel):
    x = make_x((3, 2, 4, 4), torch.float32, "cpu")
    eps = torch.rand(1, 2, 1, 1) * 0.1 if per_pixel else torch.tensor(0.05)
    scale, shift = torch.rand(2) + 0.5, torch.randn(2)
    check_engine_entry("input_box", [x, eps, scale, shift], [x, eps, scale, shift],
                       [x, eps, torch.ones(3), shift], r"scale must have shape \(C,\)")
