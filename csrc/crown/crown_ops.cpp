// The CROWN family's ops: argument checks and the flattening of A, then one algorithm for both
// devices, run with the kernels of A's device (crown_kernels.h). The steps through linear and
// conv2d layers share one algorithm, templated on the layer's adjoint contraction
// (contractions.h); their weight gradient is the interval family's (masked_weight_grad).
#include "crown_ops.h"

#include "crown_kernels.h"
#include "../interval/interval_ops.h"

#include <robprune/backend.h>
#include <robprune/checks.h>
#include <robprune/contractions.h>
#include <robprune/layer_args.h>

#include <ATen/ops/mul.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <vector>

namespace robprune {
namespace {

// --- through a ReLU ---

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
  // The neurons of one batch element: the product of lower's other sizes, never numel / batch,
  // which has no answer for batch 0.
  const int64_t batch = lower.size(0), specs = A.size(1);
  const int64_t neurons = c10::multiply_integers(lower.sizes().slice(1));
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

// --- through an affine layer ---

void check_grads(const at::Tensor& grad_A_out, const at::Tensor& grad_bias_term,
                 const at::Tensor& A, int64_t out_numel, int64_t rows, const char* op) {
  check_like(grad_A_out, "grad_A_out", A, "A");
  check_like(grad_bias_term, "grad_bias_term", A, "A");
  TORCH_CHECK(grad_A_out.numel() == out_numel && grad_bias_term.numel() == rows,
              "grad_A_out and grad_bias_term must have the shapes of ", op, "'s outputs");
}

// A's leading dimensions (all but the last `trailing`) followed by `tail`.
std::vector<int64_t> lead_then(const at::Tensor& A, int64_t trailing, std::vector<int64_t> tail) {
  std::vector<int64_t> shape(A.sizes().begin(), A.sizes().end() - trailing);
  shape.insert(shape.end(), tail.begin(), tail.end());
  return shape;
}

// The step on rows: A is (rows, C_out) for a linear layer, (rows, C_out, H_out, W_out) for a
// conv layer, dense in its own memory format (channels_last stays channels_last: the
// transposed convolution keeps it). Returns (A in terms of the layer's input, bias term of
// shape (rows,)).
template <class Contraction>
std::tuple<at::Tensor, at::Tensor> step(const Contraction& k, const at::Tensor& A,
                                        const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& mask,
                                        const c10::optional<at::Tensor>& weight_pair) {
  return with_backend(A, [&](auto tag) {
    using K = CrownKernels<typename decltype(tag)::type>;
    at::Tensor out = k.forward(A, effective_weight(weight, mask, weight_pair), c10::nullopt);
    at::Tensor term = bias ? K::bias_term(A, bias->contiguous()) : at::zeros({A.size(0)}, A.options());
    return std::make_tuple(out, term);
  });
}

// Gradient of step with respect to (A, weight, bias, mask) from those of its outputs, G
// (shaped like step's first output) and g_term (rows,).
template <class Contraction>
Grads4 step_grad(const Contraction& k, const at::Tensor& G, const at::Tensor& g_term,
                 const at::Tensor& A, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& weight_pair, std::array<bool, 4> need) {
  const at::Tensor w = weight_like(weight, weight);
  const c10::optional<at::Tensor> m = weight_like(mask, weight);
  const bool need_w = need[1] || (need[3] && m);
  auto [g_A, g_eff, unused] =
      k.backward(G, A, effective_weight(w, m, weight_pair), {need[0], need_w, false});
  // bias and g_term shaped to broadcast against A: (1, C_out, 1, 1) and (rows, 1, 1, 1).
  std::vector<int64_t> bias_shape(A.dim(), 1), term_shape(A.dim(), 1);
  bias_shape[1] = A.size(1);
  term_shape[0] = A.size(0);
  if (need[0] && bias) {
    // The bias term's share: d(term[row]) / dA[row, c, ...] = bias[c].
    g_A.add_(at::mul(g_term.view(term_shape), bias->view(bias_shape)));
  }
  at::Tensor g_bias;
  if (need[2] && bias) g_bias = at::mv((A.dim() == 4 ? A.sum(at::IntArrayRef{2, 3}) : A).t(), g_term);
  at::Tensor g_w, g_m;
  if (need_w && m) {
    std::tie(g_w, g_m) = masked_weight_grad(g_eff, w, m, need[1], need[3]);
  } else if (need_w) {
    g_w = g_eff;
  }
  return Grads4{empty_if_unused(need[0] ? g_A : at::Tensor(), A), empty_if_unused(g_w, A),
                empty_if_unused(g_bias, A), empty_if_unused(g_m, A)};
}

// The rows of A (*, out_features), after checking A against the layer: the product of the
// leading dimensions (never numel / out_features, which has no answer for out_features = 0).
int64_t linear_rows(const at::Tensor& A, const at::Tensor& weight) {
  TORCH_CHECK(A.dim() >= 1 && A.size(-1) == weight.size(0), "A's last dimension must equal ",
              "weight.size(0) (out_features = ", weight.size(0), "), got shape ", A.sizes());
  return c10::multiply_integers(A.sizes().slice(0, A.dim() - 1));
}

// The adjoint of the layer's convolution, after checking A and input_size against it.
Conv2dContraction conv_adjoint(const at::Tensor& A, const at::Tensor& weight,
                               at::IntArrayRef input_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(A.dim() >= 3, "A must have shape (*, C_out, H_out, W_out), got ", A.sizes());
  TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0,
              "input_size must be two positive ints (H_in, W_in), got ", input_size);
  check_conv_geometry(weight.size(1) * groups, input_size, "input_size", weight, stride, padding,
                      dilation, groups);
  TORCH_CHECK(A.size(-3) == weight.size(0), "A's channel dimension (dim -3) must equal ",
              "weight.size(0) (out_channels = ", weight.size(0), "), got shape ", A.sizes());
  Conv2dContraction k{stride, padding, dilation, groups, /*transposed=*/true};
  for (int d = 0; d < 2; ++d) {
    const int64_t kernel = weight.size(2 + d);
    const int64_t out = conv_output_size(input_size[d], kernel, stride[d], padding[d], dilation[d]);
    TORCH_CHECK(A.size(A.dim() - 2 + d) == out, "A's spatial size ", A.sizes().slice(A.dim() - 2),
                " must be the layer's output size for input_size ", input_size, " (",
                conv_output_size(input_size[0], weight.size(2), stride[0], padding[0], dilation[0]),
                ", ", conv_output_size(input_size[1], weight.size(3), stride[1], padding[1], dilation[1]),
                ")");
    // The rows and columns the strided forward pass dropped; always < stride.
    k.output_padding[d] = input_size[d] - ((out - 1) * stride[d] - 2 * padding[d] +
                                           dilation[d] * (kernel - 1) + 1);
  }
  return k;
}

// A's leading dimensions flattened into rows, dense in A's own memory format (a channels_last
// A, as the bound engine passes on the CPU, runs the transposed convolution without reorders).
at::Tensor conv_rows(const at::Tensor& A) {
  const int64_t n = c10::multiply_integers(A.sizes().slice(0, A.dim() - 3));
  const at::Tensor rows = A.reshape({n, A.size(-3), A.size(-2), A.size(-1)});
  return rows.contiguous(rows.suggest_memory_format());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> crown_relu_backward(const at::Tensor& A, const at::Tensor& lower,
                                                       const at::Tensor& upper, bool upper_side) {
  const Flat f = check_and_flatten(A, lower, upper);
  return with_backend(A, [&](auto tag) {
    using K = CrownKernels<typename decltype(tag)::type>;
    TORCH_CHECK(K::ordered(f.lower, f.upper), "lower must be <= upper everywhere (found lower > upper or NaN)");
    auto [out, bias] = K::relu_step(f.A, f.lower, f.upper, upper_side);
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
    using K = CrownKernels<typename decltype(tag)::type>;
    // grad_A_out has the shape of the step's output, (B, S, *neurons), in any layout.
    const at::Tensor g_out = f.order.to_kernel(grad_A_out.reshape(out_shape(lower, f.specs)));
    auto [grad_A, grad_lower, grad_upper] =
        K::relu_step_grad(g_out.reshape({f.batch, f.specs, f.neurons}).contiguous(),
                     grad_bias.reshape({f.batch, f.specs}).contiguous(), f.A, f.lower, f.upper, upper_side);
    // A shared by the batch (first dimension 1) gathers the gradient of every batch element.
    if (A.size(0) != f.batch) grad_A = grad_A.sum(0, /*keepdim=*/true);
    return std::make_tuple(f.order.from_kernel(grad_A, A.sizes()), f.order.from_kernel(grad_lower, lower.sizes()),
                           f.order.from_kernel(grad_upper, upper.sizes()));
  });
}


std::tuple<at::Tensor, at::Tensor> crown_linear_backward(
    const at::Tensor& A, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair) {
  check_layer_args(A, "A", weight, bias, mask, weight_pair, 2);
  const int64_t rows = linear_rows(A, weight);
  auto [out, term] = step(LinearAdjointContraction{}, A.reshape({rows, weight.size(0)}).contiguous(),
                          weight, bias, mask, weight_pair);
  return {out.view(lead_then(A, 1, {weight.size(1)})), term.view(lead_then(A, 1, {}))};
}

Grads4 crown_linear_backward_grad(const at::Tensor& grad_A_out, const at::Tensor& grad_bias_term,
                                  const at::Tensor& A, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& weight_pair,
                                  std::array<bool, 4> output_mask) {
  check_layer_args(A, "A", weight, bias, mask, weight_pair, 2);
  const int64_t rows = linear_rows(A, weight), in = weight.size(1);
  check_grads(grad_A_out, grad_bias_term, A, rows * in, rows, "crown_linear_backward");
  auto grads = step_grad(LinearAdjointContraction{}, grad_A_out.reshape({rows, in}).contiguous(),
                         grad_bias_term.reshape({rows}).contiguous(),
                         A.reshape({rows, weight.size(0)}).contiguous(), weight, bias, mask,
                         weight_pair, output_mask);
  if (output_mask[0]) std::get<0>(grads) = std::get<0>(grads).view(A.sizes());
  return grads;
}

std::tuple<at::Tensor, at::Tensor> crown_conv2d_backward(
    const at::Tensor& A, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair,
    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  check_layer_args(A, "A", weight, bias, mask, weight_pair, 4);
  const Conv2dContraction k = conv_adjoint(A, weight, input_size, stride, padding, dilation, groups);
  const at::Tensor rows = conv_rows(A);
  auto [out, term] = step(k, rows, weight, bias, mask, weight_pair);
  return {out.reshape(lead_then(A, 3, {weight.size(1) * groups, input_size[0], input_size[1]})),
          term.view(lead_then(A, 3, {}))};
}

Grads4 crown_conv2d_backward_grad(const at::Tensor& grad_A_out, const at::Tensor& grad_bias_term,
                                  const at::Tensor& A, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& weight_pair,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, std::array<bool, 4> output_mask) {
  check_layer_args(A, "A", weight, bias, mask, weight_pair, 4);
  const Conv2dContraction k = conv_adjoint(A, weight, input_size, stride, padding, dilation, groups);
  const at::Tensor rows = conv_rows(A);
  const int64_t n = rows.size(0), c_in = weight.size(1) * groups;
  check_grads(grad_A_out, grad_bias_term, A, n * c_in * input_size[0] * input_size[1], n,
              "crown_conv2d_backward");
  // The output's gradient in A's layout: oneDNN's backward on mixed layouts reorders first.
  const at::Tensor G = grad_A_out.reshape({n, c_in, input_size[0], input_size[1]})
                           .contiguous(rows.suggest_memory_format());
  auto grads = step_grad(k, G,
                         grad_bias_term.reshape({n}).contiguous(), rows, weight, bias, mask,
                         weight_pair, output_mask);
  if (output_mask[0]) std::get<0>(grads) = std::get<0>(grads).reshape(A.sizes());
  return grads;
}

}  // namespace robprune
