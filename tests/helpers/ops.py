"""Shared checks for the interval ops' tests: kernel against reference twin (values and
gradients), soundness against sampled points of the input box, and the bound engine's
unchecked entry points against the wrappers (and its check_radius=False)."""
import pytest
import torch

from robprune_fast import ops, reference

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}

# Soundness slack: the box is exact in real arithmetic; computed in floating point, a point
# on the box's face may land a few ulps outside. This is the documented tolerance, relative
# to the magnitude of the output bounds.
SOUND_SLACK = {torch.float32: 1e-5, torch.float64: 1e-12}

CUDA = [torch.device("cuda")] if torch.cuda.is_available() else []
# The masks a layer op is tested with: none, all pruned, none pruned, half.
MASKS = ["none", "zeros", "ones", "random"]
DEVICES = [torch.device("cpu")] + CUDA


def make_mask(kind, weight):
    """A mask of one of the MASKS kinds for weight (None for "none")."""
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand_like(weight) > 0.5).to(weight.dtype)
    return (torch.zeros_like if kind == "zeros" else torch.ones_like)(weight)


def make_box(shape, dtype, device, zero_radius_frac=0.1, generator=None):
    center = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    radius = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    radius = radius * (torch.rand(shape, dtype=dtype, device=device, generator=generator) > zero_radius_frac)
    return center, radius


def compare_with_reference(name, tensors, options, dtype):
    """Runs ops.<name> and reference.<name> on the same inputs; compares both outputs and the
    gradients of every floating tensor input under a random cotangent."""
    op, ref = getattr(ops, name), getattr(reference, name)
    diff = {k: v for k, v in tensors.items() if v is not None}
    a_in = {k: (v.detach().clone().requires_grad_(True) if k in diff else v) for k, v in tensors.items()}
    b_in = {k: (v.detach().clone().requires_grad_(True) if k in diff else v) for k, v in tensors.items()}
    out_a = op(**a_in, **options)
    out_b = ref(**b_in, **options)
    for got, want in zip(out_a, out_b):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype])
    # An output the twin makes as a constant (a zero bias term without a bias) has no
    # gradient to compare; the op's version of it must not contribute one either.
    pairs = [(a, b) for a, b in zip(out_a, out_b) if b.requires_grad]
    cotangents = [torch.randn_like(b) for _, b in pairs]
    torch.autograd.backward([a for a, _ in pairs], cotangents)
    torch.autograd.backward([b for _, b in pairs], cotangents)
    for k in diff:
        torch.testing.assert_close(a_in[k].grad, b_in[k].grad, **TOL[dtype], msg=f"grad of {k}")


def assert_sound(layer, center, radius, weight, bias, mask, options, samples=64):
    """Points of the box (interior and corners), sent through the real layer, land inside the
    op's output bounds."""
    lower, upper = getattr(ops, layer["op"])(center, radius, weight, bias, mask,
                                             **options, out_bounds=True)
    slack = SOUND_SLACK[center.dtype] * (1 + torch.maximum(lower.abs(), upper.abs()).amax())
    w = weight if mask is None else weight * mask
    for i in range(samples):
        u = torch.rand_like(center) * 2 - 1
        if i % 2:  # corners, where the bounds are attained
            u = u.sign()
        x = center + radius * u
        if options.get("relu_in"):
            x = torch.relu(x)
        y = layer["apply"](x, w, bias)
        assert bool((y >= lower - slack).all()), f"sample {i} below the lower bound"
        assert bool((y <= upper + slack).all()), f"sample {i} above the upper bound"


def check_engine_entry(name, args, private_args, bad_private_args, match):
    """ops.unchecked.<name>(*private_args), the bound engine's entry without the Python checks, gives
    ops.<name>(*args)'s outputs bit for bit, with grad mode off (below the autograd layer) and
    on (gradients too, for differentiable ops), and the kernel's own checks still refuse bad
    input through it."""
    public, private = getattr(ops, name), getattr(ops.unchecked, name)
    differentiable = not name.endswith("_")  # a trailing _ marks an in-place op

    def run(fn, inputs, grad):
        inputs = [t.detach().clone().requires_grad_(grad and differentiable and t.is_floating_point())
                  if isinstance(t, torch.Tensor) else t for t in inputs]
        with torch.set_grad_enabled(grad):
            out = fn(*inputs)
        return inputs, out

    for grad in (False, True):
        (a_in, want), (b_in, got) = run(public, args, grad), run(private, private_args, grad)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
            assert g.requires_grad == w.requires_grad
        if grad and differentiable:
            cot = [torch.randn_like(w) for w in want]
            torch.autograd.backward(list(want), cot)
            torch.autograd.backward(list(got), cot)
            for a, b in zip(a_in, b_in):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    assert torch.equal(a.grad, b.grad)
    with pytest.raises(RuntimeError, match=match), torch.no_grad():
        private(*bad_private_args)


def check_radius_flag(op, args, bad_args):
    """op(*args, check_radius=False), for a caller that made the radius itself: the same
    outputs as with the check, and no pass that refuses a negative radius; the default checks.
    opcheck with the argument given (the fake kernel and autograd count it, or its absence)."""
    graded = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(op, tuple(graded), {"check_radius": False})
    want = op(*args)
    got = op(*args, check_radius=False)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(RuntimeError, match="radius must be >= 0"):
        op(*bad_args)
    op(*bad_args, check_radius=False)
