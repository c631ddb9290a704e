// crown_relu_backward and its gradient: argument checks, flattening to (B, S, N), then the
// kernels of the input's device (crown_relu_kernels.h).
#include "crown_relu_ops.h"

#include "crown_relu_kernels.h"

#include <robprune/backend.h>
#include <robprune/checks.h>

#include <vector>

namespace robprune {
namespace {

struct Flat {
  at::Tensor A, lower, upper;
  int64_t batch, specs, neurons;
};

Flat check_and_flatten(const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper) {
  check_float(A, "A");
  check_like(lower, "lower", A, "A");
  check_like(upper, "upper", A, "A");
  check_same_shape(upper, "upper", lower, "lower");
  TORCH_CHECK(lower.dim() >= 1, "lower must have shape (B, *neurons), got ", lower.sizes());
  TORCH_CHECK(A.dim() == lower.dim() + 1 && A.sizes().slice(2) == lower.sizes().slice(1),
              "A must have shape (B or 1, S, *neurons) with neurons = ", lower.sizes().slice(1),
              " (the shape of lower without its batch dimension), got ", A.sizes());
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = lower.numel() / std::max<int64_t>(batch, 1);
  TORCH_CHECK(A.size(0) == batch || A.size(0) == 1, "A's first dimension must be 1 or the batch size ",
              batch, ", got ", A.size(0));
  return {A.reshape({A.size(0), specs, neurons}).contiguous(), lower.reshape({batch, neurons}).contiguous(),
          upper.reshape({batch, neurons}).contiguous(), batch, specs, neurons};
}

std::vector<int64_t> out_shape(const at::Tensor& lower, int64_t specs) {
  std::vector<int64_t> shape{lower.size(0), specs};
  shape.insert(shape.end(), lower.sizes().begin() + 1, lower.sizes().end());
  return shape;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> crown_relu_backward(const at::Tensor& A, const at::Tensor& lower,
                                                       const at::Tensor& upper, bool upper_side) {
  const Flat f = check_and_flatten(A, lower, upper);
  return with_backend(A, [&](auto tag) {
    using K = CrownReluKernels<typename decltype(tag)::type>;
    TORCH_CHECK(K::ordered(f.lower, f.upper), "lower must be <= upper everywhere (found lower > upper or NaN)");
    auto [out, bias] = K::step(f.A, f.lower, f.upper, upper_side);
    return std::make_tuple(out.view(out_shape(lower, f.specs)), bias);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_backward_grad(
    const at::Tensor& grad_A_out, const at::Tensor& grad_bias, const at::Tensor& A,
    const at::Tensor& lower, const at::Tensor& upper, bool upper_side) {
  const Flat f = check_and_flatten(A, lower, upper);
  check_like(grad_A_out, "grad_A_out", A, "A");
  check_like(grad_bias, "grad_bias", A, "A");
  TORCH_CHECK(grad_A_out.numel() == f.batch * f.specs * f.neurons && grad_bias.numel() == f.batch * f.specs,
              "grad_A_out and grad_bias must have the shapes of crown_relu_backward's outputs");
  return with_backend(A, [&](auto tag) {
    using K = CrownReluKernels<typename decltype(tag)::type>;
    auto [grad_A, grad_lower, grad_upper] =
        K::step_grad(grad_A_out.reshape({f.batch, f.specs, f.neurons}).contiguous(),
                     grad_bias.reshape({f.batch, f.specs}).contiguous(), f.A, f.lower, f.upper, upper_side);
    // A shared by the batch (first dimension 1) gathers the gradient of every batch element.
    if (A.size(0) != f.batch) grad_A = grad_A.sum(0, /*keepdim=*/true);
    return std::make_tuple(grad_A.view(A.sizes()), grad_lower.view(lower.sizes()), grad_upper.view(upper.sizes()));
  });
}

}  // namespace robprune
