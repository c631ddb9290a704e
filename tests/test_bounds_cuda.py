"""The bound engine on a GPU: every method, layer type and training objective gives on CUDA what
it gives on the CPU (float64: to rounding; float32: within the kernels' tolerance, TF32 left on
by the caller or not), and its bounds hold for points of the ball sampled there. Skipped
without a GPU (CI has none); scripts/gpu_check.sh runs it on a GPU machine."""
import pytest
import torch
from torch.nn.utils import prune

from robprune_fast import bounds, loss_fusion, models, objectives
from tests.helpers.bound_models import TOL64, ball_samples, cnn, inputs, maxpool_cnn, mlp, resnet

METHODS = bounds.METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")
EPS = 0.05

# name: (builder, input shape, methods it supports)
MODELS = {
    "mlp": (mlp, (1, 6, 6), METHODS),
    "cnn": (cnn, (2, 10, 10), METHODS),
    "maxpool": (maxpool_cnn, (1, 8, 8), ("ibp",)),
    "resnet": (resnet, (1, 8, 8), ("ibp",)),
}
CASES = [(name, method) for name, (_, _, methods) in MODELS.items() for method in methods]


def _to_gpu(build, *tensors):
    """A second copy of build's (seeded) model, and the tensors, on the GPU. Built anew rather
    than deep-copied: a pruned layer's weight is a non-leaf tensor, which deepcopy refuses."""
    return (build().to(GPU), *(None if t is None else t.to(GPU) for t in tensors))


def _assert_holds(model, x, lower, upper, C, slack, n=400):
    """Points of the ball, through the model on the GPU, land inside the GPU's bounds."""
    samples = ball_samples(x.cpu(), EPS, n).to(x.device)
    with torch.no_grad():
        ys = model(samples.flatten(0, 1)).view(n, x.shape[0], -1)
    if C is not None:
        ys = torch.einsum("bsk,nbk->nbs", C, ys)
    ys = ys.view(n, *lower.shape)
    assert (ys >= lower - slack).all(), "a sampled output lies below the lower bound"
    assert (ys <= upper + slack).all(), "a sampled output lies above the upper bound"


@pytest.mark.parametrize("with_spec", [False, True], ids=["logits", "margins"])
@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_float64_bounds_match_cpu_and_hold(name, method, with_spec):
    build, shape, _ = MODELS[name]
    model, x = build(), inputs(shape, n=4)
    with torch.no_grad():
        classes = model(x).shape[1]
    C = bounds.margin_spec(torch.tensor([0, 2, 1, 0]), classes, torch.float64) if with_spec else None
    lower, upper = bounds.compute_bounds(model, x, EPS, method, C)
    gmodel, gx, gC = _to_gpu(build, x, C)
    glower, gupper = bounds.compute_bounds(gmodel, gx, EPS, method, gC)
    assert glower.device.type == "cuda" and glower.dtype == torch.float64
    torch.testing.assert_close(glower.cpu(), lower, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gupper.cpu(), upper, atol=1e-9, rtol=1e-9)
    _assert_holds(gmodel, gx, glower, gupper, gC, TOL64)
    if method == "ibp":  # without autograd IBP maps its boxes through the ReLUs in place
        with torch.no_grad():
            nlower, nupper = bounds.compute_bounds(gmodel, gx, EPS, method, gC)
        assert torch.equal(nlower, glower) and torch.equal(nupper, gupper)


def _cnn_small():
    torch.manual_seed(7)
    return models.build("cnn_small").eval()


@pytest.mark.parametrize("method", METHODS)
def test_float32_cnn_small_matches_cpu_even_with_tf32_on(method):
    """A training loop may switch TF32 on; the bounds must still be computed in full float32:
    with TF32 they would drift from the CPU's by ~1e-3 relative, far beyond this tolerance."""
    model = _cnn_small()
    x = torch.rand(6, 3, 32, 32)
    C = bounds.margin_spec(torch.tensor([0, 3, 9, 1, 5, 5]), 10)
    eps = 2 / 255
    lower, upper = bounds.compute_bounds(model, x, eps, method, C, max_memory=1 << 26)
    gmodel, gx, gC = _to_gpu(_cnn_small, x, C)
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "tf32"
        glower, gupper = bounds.compute_bounds(gmodel, gx, eps, method, gC, max_memory=1 << 26)
        assert [k.fp32_precision for k in knobs] == ["tf32", "tf32"], "flags not restored"
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value
    scale = 1 + torch.maximum(lower.abs(), upper.abs()).amax().item()
    torch.testing.assert_close(glower.cpu(), lower, atol=2e-5 * scale, rtol=0)
    torch.testing.assert_close(gupper.cpu(), upper, atol=2e-5 * scale, rtol=0)
    with bounds.exact_float():
        _assert_holds(gmodel, gx, glower, gupper, gC, 1e-4 * scale, n=64)


def test_crown_chunks_under_a_small_memory_cap_on_gpu():
    gmodel, gx = _to_gpu(cnn, inputs((2, 10, 10), n=4))
    whole = bounds.compute_bounds(gmodel, gx, EPS, "crown")
    chunked = bounds.compute_bounds(gmodel, gx, EPS, "crown", max_memory=4096)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _masked_digits_cnn():
    torch.manual_seed(8)
    model = models.digits_cnn()
    model.insert(2, torch.nn.BatchNorm2d(16))  # train-mode batch statistics on the GPU too
    prune.random_unstructured(model[1], "weight", amount=0.6)
    prune.random_unstructured(model[7], "weight", amount=0.4)
    return model.double().train()


@pytest.mark.parametrize("objective,hyper", [
    ("ibp", dict(reg=True)),
    ("crown-ibp", dict(beta_end=0.5)),
    ("crown-ibp", dict(beta_end=0.5, loss_fusion=True)),
], ids=["ibp-reg", "crown-ibp", "crown-ibp-fused"])
def test_training_objectives_match_cpu_with_gradients(objective, hyper):
    """Loss and the gradients of the pruned model's scores (weight_orig) agree across devices."""
    model = _masked_digits_cnn()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([0, 3, 9, 1, 3])
    loss_fn = objectives.build(objective, eps=0.03, **hyper)
    gmodel, gx, gy = _to_gpu(_masked_digits_cnn, x, y)
    losses, grads = [], []
    for m, xi, yi in ((model, x, y), (gmodel, gx, gy)):
        loss, _ = loss_fn(m, xi, yi, 0.8)
        m.zero_grad()
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append([p.grad.cpu() for p in m.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-9, rtol=1e-9)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7)


def test_fused_loss_bound_holds_on_gpu():
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    y = torch.tensor([2, 7, 7, 0])
    gmodel, gx, gy = _to_gpu(_masked_digits_cnn, x, y)
    gmodel.eval()
    bound, _ = loss_fusion.fused_ce_bound(gmodel, gx, gy, 0.03, 10)
    samples = ball_samples(x, 0.03, 200).to(GPU)
    with torch.no_grad():
        losses = torch.stack([torch.nn.functional.cross_entropy(gmodel(p), gy, reduction="none")
                              for p in samples])
    assert (losses <= bound + 1e-9).all()


def test_verified_accuracy_agrees_with_cpu():
    model = cnn()
    x = inputs((2, 10, 10), n=6)
    y = model(x).argmax(1)
    cpu = bounds.verified_accuracy(model, x, y, 0.01, "crown-ibp")
    gmodel, gx, gy = _to_gpu(cnn, x, y)
    gpu = bounds.verified_accuracy(gmodel, gx, gy, 0.01, "crown-ibp")
    assert torch.equal(gpu.verified.cpu(), cpu.verified) and torch.equal(gpu.correct.cpu(), cpu.correct)
    torch.testing.assert_close(gpu.margin_lower.cpu(), cpu.margin_lower, atol=1e-9, rtol=1e-9)
    assert gpu.unstable == cpu.unstable
