"""relu_box_: the ReLU of a box written over its own storage. Against the reference twin (and
the relu_in prologue it replaces, bit for bit), odd layouts, opcheck of the mutating op,
soundness of the box, bad input through the wrapper and through torch.ops."""
import pytest
import torch

from tests.helpers.ops import DEVICES, SOUND_SLACK, check_engine_entry, make_box
from robprune_fast import ops, reference


def layouts(center, radius, layout):
    if layout == "channels_last":
        return (center.contiguous(memory_format=torch.channels_last),
                radius.contiguous(memory_format=torch.channels_last))
    if layout == "transposed":  # dense but not contiguous
        return center.transpose(0, 1), radius.transpose(0, 1)
    return center, radius


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,layout", [
    ((1, 1, 1, 1), "contiguous"), ((7, 5, 3, 9), "contiguous"), ((7, 5, 3, 9), "channels_last"),
    ((6, 13), "transposed"), ((0, 4, 2, 2), "contiguous"), ((33,), "contiguous"),
    ((2, 3, 4, 5, 6), "contiguous"),
])
def test_matches_reference(device, dtype, shape, layout):
    g = torch.Generator().manual_seed(0)
    center, radius = make_box(shape, dtype, "cpu", generator=g)
    center, radius = layouts(center.to(device), radius.to(device), layout)
    want = reference.relu_box(center, radius)
    c, r = center.clone(memory_format=torch.preserve_format), radius.clone(memory_format=torch.preserve_format)
    pointers = (c.data_ptr(), r.data_ptr())
    got = ops.relu_box_(c, r)
    assert got[0] is c and got[1] is r and (c.data_ptr(), r.data_ptr()) == pointers
    assert c.stride() == center.stride()
    torch.testing.assert_close(c, want[0], atol=0, rtol=0)
    torch.testing.assert_close(r, want[1], atol=0, rtol=0)


@pytest.mark.parametrize("stable", ["all_active", "all_dead", "mixed"])
def test_stable_neurons(stable):
    """Active neurons keep their box, dead ones collapse to 0, unstable ones are clipped."""
    center = {"all_active": torch.full((4, 8), 3.0), "all_dead": torch.full((4, 8), -3.0),
              "mixed": torch.linspace(-2, 2, 32).view(4, 8)}[stable]
    radius = torch.full_like(center, 1.0)
    c, r = ops.relu_box_(center.clone(), radius.clone())
    lower, upper = torch.relu(center - radius), torch.relu(center + radius)
    torch.testing.assert_close(c - r, lower, atol=1e-6, rtol=0)
    torch.testing.assert_close(c + r, upper, atol=1e-6, rtol=0)


def test_matches_relu_in_prologue():
    """An interval layer on the in-place ReLU'd box gives what relu_in gives, exactly."""
    torch.manual_seed(3)
    center, radius = make_box((5, 4, 9, 9), torch.float32, "cpu")
    weight, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    want = ops.interval_conv2d(center, radius, weight, bias, relu_in=True, padding=1)
    c, r = ops.relu_box_(center.clone(), radius.clone())
    got = ops.interval_conv2d(c, r, weight, bias, padding=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_box_is_sound(dtype):
    """relu of every point of the box (corners included) lies in the new box."""
    torch.manual_seed(4)
    center, radius = make_box((3, 40), dtype, "cpu")
    c, r = ops.relu_box_(center.clone(), radius.clone())
    for i in range(64):
        u = torch.rand_like(center) * 2 - 1
        if i % 2:
            u = u.sign()
        point = torch.relu(center + radius * u)
        assert bool(((point - c).abs() <= r + SOUND_SLACK[dtype] * 4).all())


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    center, radius = make_box((3, 2, 4, 4), torch.float32, device)
    torch.library.opcheck(torch.ops.robprune_fast.relu_box_, (center, radius))


def test_engine_entry():
    center, radius = make_box((3, 2, 4, 4), torch.float32, "cpu")
    check_engine_entry("relu_box_", [center, radius], [center, radius], [center, -radius - 1],
                       "radius must be >= 0")


@pytest.mark.parametrize("make,match,error", [
    (lambda c, r: (c, -r - 1), "radius must be >= 0", RuntimeError),
    (lambda c, r: (c, r.double()), "radius must have the dtype of center", TypeError),
    (lambda c, r: (c, r[:, :2]), "radius must have the shape of center", ValueError),
    (lambda c, r: (c.half(), r.half()), "center must be float32 or float64", TypeError),
    (lambda c, r: (c, r.t().contiguous().t()), "laid out alike", ValueError),
    (lambda c, r: (c.requires_grad_(True), r), "not differentiable", ValueError),
])
def test_bad_input(make, match, error):
    center, radius = make_box((4, 3), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        ops.relu_box_(*make(center, radius))


# Boxes near the top of the float range, (centre, radius): the first fits, but the sum of its
# ReLU'd bounds overflows; the second's upper bound overflows; the last has an infinite radius
# around a finite centre.
HUGE = {torch.float32: [(2.5e38, 5e37), (3e38, 3e38), (1.0, float("inf"))],
        torch.float64: [(1.5e308, 2.5e307), (1.7e308, 1.7e308), (1.0, float("inf"))]}


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(3))
def test_overflow_never_shrinks_the_box(device, dtype, case):
    """Overflow in the ReLU of a box (the relu_in prologue, relu_box_, the twin) may widen the
    box to infinity, never make it smaller than the exact one: its lower bound stays below the
    exact ReLU'd lower bound and its upper bound above the exact upper one (to the soundness
    slack), or they are NaN, which never certifies."""
    c0, r0 = HUGE[dtype][case]
    center = torch.tensor([c0, -1.0, 0.5], dtype=dtype, device=device)
    radius = torch.tensor([r0, 0.5, 1.0], dtype=dtype, device=device)
    exact_lo, exact_hi = torch.relu(center - radius), torch.relu(center + radius)
    slack_lo = SOUND_SLACK[dtype] * (1 + exact_lo.abs())
    slack_hi = SOUND_SLACK[dtype] * (1 + exact_hi.abs())
    eye = torch.eye(3, dtype=dtype, device=device)
    outputs = {"relu_box_": ops.relu_box_(center.clone(), radius.clone()),
               "twin": reference.relu_box(center, radius)}
    outputs = {name: (c - r, c + r) for name, (c, r) in outputs.items()}
    for name, fn in (("interval_linear", ops.interval_linear), ("interval_linear twin", reference.interval_linear)):
        lower, upper = fn(center[None], radius[None], eye, None, None, True, True)
        outputs[name] = lower[0], upper[0]
    for name, (lower, upper) in outputs.items():
        assert not bool((lower > exact_lo + slack_lo).any()), f"{name}: lower {lower} above {exact_lo}"
        assert not bool((upper < exact_hi - slack_hi).any()), f"{name}: upper {upper} below {exact_hi}"
