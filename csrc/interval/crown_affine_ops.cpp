// CROWN's backward steps through linear and conv2d layers: argument checks, flattening of A's
// leading dimensions into rows, then one algorithm for both layer kinds, templated on the
// adjoint contraction (contractions.h), with the bias term from crown_affine_kernels.h.
#include "crown_affine_ops.h"

#include "box_kernels.h"
#include "contractions.h"
#include "crown_affine_kernels.h"
#include "layer_args.h"

#include <robprune/backend.h>
#include <robprune/checks.h>

#include <ATen/ops/mul.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace robprune {
namespace {

void check_step_args(const at::Tensor& A, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                     const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim) {
  check_float(A, "A");
  check_layer_weights(weight, bias, mask, weight_pair, weight_dim, A, "A");
}

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

// weight * mask: the cached pair's first half when given, else made here.
at::Tensor effective_weight(const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                            const c10::optional<at::Tensor>& weight_pair) {
  if (weight_pair) return weight_pair->select(0, 0);
  return mask ? at::mul(weight, *mask) : weight;
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
    using K = CrownAffineKernels<typename decltype(tag)::type>;
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
  return with_backend(A, [&](auto tag) {
    using K = BoxKernels<typename decltype(tag)::type>;
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
    if (need[2] && bias) g_bias = at::mv((A.dim() == 4 ? A.sum({2, 3}) : A).t(), g_term);
    at::Tensor g_w, g_m;
    if (need_w && m) {
      std::tie(g_w, g_m) = K::weight_grad(weight_like(g_eff, w), at::Tensor(), w, m, need[1], need[3]);
    } else if (need_w) {
      g_w = g_eff;
    }
    return Grads4{empty_if_unused(need[0] ? g_A : at::Tensor(), A), empty_if_unused(g_w, A),
                  empty_if_unused(g_bias, A), empty_if_unused(g_m, A)};
  });
}

int64_t linear_rows(const at::Tensor& A, const at::Tensor& weight) {
  TORCH_CHECK(A.dim() >= 1 && A.size(-1) == weight.size(0), "A's last dimension must equal ",
              "weight.size(0) (out_features = ", weight.size(0), "), got shape ", A.sizes());
  return A.numel() / std::max<int64_t>(weight.size(0), 1);
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
  const at::Tensor rows = A.reshape({-1, A.size(-3), A.size(-2), A.size(-1)});
  return rows.contiguous(rows.suggest_memory_format());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> crown_linear_backward(
    const at::Tensor& A, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair) {
  check_step_args(A, weight, bias, mask, weight_pair, 2);
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
  check_step_args(A, weight, bias, mask, weight_pair, 2);
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
  check_step_args(A, weight, bias, mask, weight_pair, 4);
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
  check_step_args(A, weight, bias, mask, weight_pair, 4);
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
