// crown_relu_backward and its gradient: argument checks, flattening to (B, S, N), then the
// kernels of the input's device (crown_relu_kernels.h).
#include "crown_relu_ops.h"

#include "crown_relu_kernels.h"

#include <robprune/backend.h>
#include <robprune/checks.h>

#include <vector>

namespace robprune {
namespace {

// A's neuron dimensions (C, H, W) may be laid out channels-last, the layout CROWN's conv steps
// run in on the CPU (crown_conv2d_backward keeps it): the kernels then walk the neurons in
// (H, W, C) order, with the bounds permuted alike, and the outputs keep A's layout. The
// kernels only need A and the bounds to list the neurons in the same order.
struct NeuronOrder {
  bool channels_last;

  static NeuronOrder of(const at::Tensor& A) {
    return {A.dim() == 5 && !A.is_contiguous() && A.permute({0, 1, 3, 4, 2}).is_contiguous()};
  }
  // (B, *neurons) or (B, S, *neurons) -> the same with the neurons in kernel order.
  at::Tensor to_kernel(const at::Tensor& t) const {
    if (!channels_last) return t;
    return t.dim() == 4 ? t.permute({0, 2, 3, 1}) : t.permute({0, 1, 3, 4, 2});
  }
  // A flat (lead..., N) result back to `shape` (lead..., C, H, W), in A's layout.
  at::Tensor from_kernel(const at::Tensor& t, at::IntArrayRef shape) const {
    if (!channels_last) return t.view(shape);
    const int64_t n = shape.size();
    std::vector<int64_t> permuted(shape.begin(), shape.end() - 3);
    permuted.insert(permuted.end(), {shape[n - 2], shape[n - 1], shape[n - 3]});
    return n == 4 ? t.view(permuted).permute({0, 3, 1, 2}) : t.view(permuted).permute({0, 1, 4, 2, 3});
  }
};

struct Flat {
  at::Tensor A, lower, upper;
  int64_t batch, specs, neurons;
  NeuronOrder order;
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
  const NeuronOrder order = NeuronOrder::of(A);
  return {order.to_kernel(A).reshape({A.size(0), specs, neurons}).contiguous(),
          order.to_kernel(lower).reshape({batch, neurons}).contiguous(),
          order.to_kernel(upper).reshape({batch, neurons}).contiguous(), batch, specs, neurons, order};
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
    return std::make_tuple(f.order.from_kernel(out, out_shape(lower, f.specs)), bias);
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
    // grad_A_out has the shape of the step's output, (B, S, *neurons), in any layout.
    const at::Tensor g_out = f.order.to_kernel(grad_A_out.reshape(out_shape(lower, f.specs)));
    auto [grad_A, grad_lower, grad_upper] =
        K::step_grad(g_out.reshape({f.batch, f.specs, f.neurons}).contiguous(),
                     grad_bias.reshape({f.batch, f.specs}).contiguous(), f.A, f.lower, f.upper, upper_side);
    // A shared by the batch (first dimension 1) gathers the gradient of every batch element.
    if (A.size(0) != f.batch) grad_A = grad_A.sum(0, /*keepdim=*/true);
    return std::make_tuple(f.order.from_kernel(grad_A, A.sizes()), f.order.from_kernel(grad_lower, lower.sizes()),
                           f.order.from_kernel(grad_upper, upper.sizes()));
  });
}

}  // namespace robprune
