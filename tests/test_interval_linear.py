"""interval_linear: kernel against reference twin, opcheck, gradcheck, soundness, bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.ops import (DEVICES, assert_sound, check_engine_entry, check_radius_flag,
                              compare_with_reference, make_box)
from robprune_fast import ops, reference
from robprune_fast.ops import _dispatch, weight_pair

OPTIONS = [dict(relu_in=r, out_bounds=o) for r in (False, True) for o in (False, True)]


def linear_inputs(batch, in_f, out_f, dtype, device, bias=True, mask=None):
    center, radius = make_box(batch + (in_f,), dtype, device)
    weight = torch.randn(out_f, in_f, dtype=dtype, device=device)
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    if mask == "random":
        mask = (torch.rand(out_f, in_f, device=device) > 0.5).to(dtype)
    elif mask == "zeros":
        mask = torch.zeros(out_f, in_f, dtype=dtype, device=device)
    elif mask == "ones":
        mask = torch.ones(out_f, in_f, dtype=dtype, device=device)
    return dict(center=center, radius=radius, weight=weight, bias=b, mask=mask)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("batch,in_f,out_f,bias,mask", [
    ((1,), 7, 5, True, None),
    ((128,), 33, 17, True, "random"),
    ((4, 3), 9, 11, False, "ones"),
    ((5,), 13, 3, True, "zeros"),
    ((0,), 6, 4, True, None),
])
def test_matches_reference(device, dtype, options, batch, in_f, out_f, bias, mask):
    inputs = linear_inputs(batch, in_f, out_f, dtype, device, bias, mask)
    compare_with_reference("interval_linear", inputs, options, dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_non_contiguous_inputs(device):
    inputs = linear_inputs((10,), 12, 6, torch.float32, device, mask="random")
    inputs["center"] = torch.randn(12, 10, device=device).t()  # transposed view
    inputs["radius"] = torch.rand(10, 24, device=device)[:, ::2]  # strided slice
    inputs["weight"] = torch.randn(12, 6, device=device).t()
    compare_with_reference("interval_linear", inputs, dict(relu_in=True, out_bounds=True), torch.float32)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_opcheck(device):
    for options in OPTIONS:
        inputs = linear_inputs((6,), 5, 4, torch.float32, device, mask="random")
        args = [inputs[k] for k in ("center", "radius", "weight", "bias", "mask")]
        for t in args:
            t.requires_grad_(True)
        pair = ops.masked_weight_pair(inputs["weight"].detach(), inputs["mask"].detach())
        torch.library.opcheck(torch.ops.robprune_fast.interval_linear,
                              (*args, pair, options["relu_in"], options["out_bounds"]))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_gradcheck_float64(options):
    inputs = linear_inputs((3,), 4, 5, torch.float64, "cpu")
    inputs["radius"] = inputs["radius"] + 0.1  # gradcheck's perturbations must keep radius >= 0
    inputs["mask"] = torch.rand(5, 4, dtype=torch.float64) + 0.5  # away from |w m|'s kink at 0
    tensors = [inputs[k].requires_grad_(True) for k in ("center", "radius", "weight", "bias", "mask")]
    assert torch.autograd.gradcheck(lambda c, r, w, b, m: ops.interval_linear(c, r, w, b, m, **options),
                                    tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu_in", [False, True])
def test_sound(dtype, relu_in):
    torch.manual_seed(0)
    inputs = linear_inputs((64,), 40, 30, dtype, "cpu", mask="random")
    layer = dict(op="interval_linear", apply=lambda x, w, b: F.linear(x, w, b))
    assert_sound(layer, **inputs, options=dict(relu_in=relu_in))


def test_weight_cache_follows_updates():
    """Inside weight_cache(), the cached |W * M| is remade after an optimiser step and after a
    new mask, and reused while neither changes."""
    inputs = linear_inputs((8,), 6, 4, torch.float32, "cpu", mask="random")
    weight = torch.nn.Parameter(inputs["weight"])
    opt = torch.optim.SGD([weight], lr=0.5)
    with ops.weight_cache():
        mask = torch.ones_like(weight)
        ops.interval_linear(inputs["center"], inputs["radius"], weight, None, mask)
        first = weight_pair._pair_cache[weight][2]
        ops.interval_linear(inputs["center"], inputs["radius"], weight, None, mask)
        assert weight_pair._pair_cache[weight][2] is first
        _check_cache_follows_updates(inputs, weight, opt)
    assert len(weight_pair._pair_cache) == 0


def _check_cache_follows_updates(inputs, weight, opt):
    for step in range(3):
        mask = (torch.rand_like(weight) > 0.3).float()
        got = ops.interval_linear(inputs["center"], inputs["radius"], weight, inputs["bias"], mask)
        want = reference.interval_linear(inputs["center"], inputs["radius"], weight, inputs["bias"], mask)
        torch.testing.assert_close(got, want)
        got[1].sum().backward()
        opt.step()
        opt.zero_grad()


def test_reference_fallback_warns_once(monkeypatch, recwarn):
    monkeypatch.setattr(_dispatch, "has_kernel_for", lambda name, device_type: False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    inputs = linear_inputs((3,), 4, 2, torch.float32, "cpu")
    for _ in range(3):
        got = ops.interval_linear(**inputs)
    assert len([w for w in recwarn if "reference" in str(w.message)]) == 1
    torch.testing.assert_close(got, reference.interval_linear(**inputs))
    with pytest.raises(ValueError, match="radius must be >= 0"):
        ops.interval_linear(inputs["center"], -inputs["radius"] - 1, inputs["weight"])


@pytest.mark.parametrize("change,match", [
    (dict(radius=torch.rand(3, 5)), "radius must have the shape of center"),
    (dict(radius=torch.rand(3, 4, dtype=torch.float64)), "radius must have the dtype of center"),
    (dict(center=torch.randn(3, 4).half(), radius=torch.rand(3, 4).half()), "center must be float32 or float64"),
    (dict(center=torch.randint(0, 3, (3, 4))), "center must be float32 or float64"),
    (dict(weight=torch.randn(2, 5)), r"in_features = 5"),
    (dict(weight=torch.randn(2, 4, 1)), "weight must be 2-D"),
    (dict(bias=torch.randn(3)), r"bias must have shape \(2,\)"),
    (dict(mask=torch.ones(4, 2)), "mask must have the shape of weight"),
    (dict(mask=torch.ones(2, 4, device="meta")), "mask must be on the device of center"),
])
def test_bad_input(change, match):
    args = dict(center=torch.randn(3, 4), radius=torch.rand(3, 4), weight=torch.randn(2, 4),
                bias=torch.randn(2), mask=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.interval_linear(**args)


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_bad_radius_values(bad):
    radius = torch.rand(3, 4)
    radius[1, 2] = bad
    with pytest.raises(RuntimeError, match="radius must be >= 0"):
        ops.interval_linear(torch.randn(3, 4), radius, torch.randn(2, 4))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_engine_entry(options):
    t = linear_inputs((3,), 5, 4, torch.float32, "cpu", mask="random")
    args = [t[k] for k in ("center", "radius", "weight", "bias", "mask")] + list(options.values())
    bad = [t["center"], -t["radius"] - 1, *args[2:]]
    check_engine_entry("interval_linear", args, args, bad, "radius must be >= 0")


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("relu_in", [False, True])
def test_check_radius_flag(device, relu_in):
    t = linear_inputs((3,), 5, 4, torch.float32, device, mask="random")
    tensors = [t[k] for k in ("center", "radius", "weight", "bias", "mask")]
    bad = [t["center"], -t["radius"] - 1, *tensors[2:]]
    flags = [None, relu_in, True]  # no weight pair; relu_in; out_bounds
    check_radius_flag(torch.ops.robprune_fast.interval_linear, tensors + flags, bad + flags)


def test_box_from_bounds():
    lower, upper = torch.randn(5), torch.randn(5)
    lower, upper = torch.minimum(lower, upper), torch.maximum(lower, upper)
    c, r = ops.box_from_bounds(lower, upper)
    torch.testing.assert_close(c - r, lower)
    torch.testing.assert_close(c + r, upper)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        ops.box_from_bounds(upper + 1, upper)
