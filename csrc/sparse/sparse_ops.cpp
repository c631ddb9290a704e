// The sparse family's ops: argument checks, then one algorithm for both devices. The dense path
// of masked_linear / masked_conv2d is a layer of one product (contractions.h) on the effective
// weight, its weight and mask gradients made in one pass by the interval family's
// masked_weight_grad; linear and conv2d share it, templated on the contraction.
#include "sparse_ops.h"

#include "../interval/interval_ops.h"

#include <robprune/checks.h>
#include <robprune/contractions.h>
#include <robprune/layer_args.h>

#include <c10/util/accumulate.h>

#include <vector>

namespace robprune {
namespace {

void check_masked_args(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim) {
  check_float(x, "x");
  check_layer_weights(weight, bias, mask, weight_pair, weight_dim, x, "x");
  if (weight_pair) check_weight_pair(*weight_pair, weight, mask);
}

// x (*, in_features) checked against the weight; returns the rows its leading dimensions hold
// (never numel / in_features, which has no answer for in_features = 0).
int64_t linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dimension must equal ",
              "weight.size(1) (in_features = ", weight.size(1), "), got shape ", x.sizes());
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

Conv2dContraction conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dim(x, "x", 4, "(N, C, H, W)");
  check_conv_geometry(x.size(1), x.sizes().slice(2), "x", weight, stride, padding, dilation, groups);
  return Conv2dContraction{stride, padding, dilation, groups};
}

// The gradients from grad (shaped like the layer's output, laid out like x's format).
template <class Contraction>
Grads4 backward(const Contraction& k, const at::Tensor& grad, const at::Tensor& x,
                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                const c10::optional<at::Tensor>& weight_pair, std::array<bool, 4> need) {
  const at::Tensor w = weight_like(weight, weight);
  const c10::optional<at::Tensor> m = weight_like(mask, weight);
  const bool need_w = need[1] || (need[3] && m);
  auto [g_x, g_eff, g_bias] = k.backward(grad.contiguous(x.suggest_memory_format()), x,
                                         effective_weight(w, m, weight_pair), {need[0], need_w, need[2]});
  at::Tensor g_w, g_m;
  if (need_w && m) {
    std::tie(g_w, g_m) = masked_weight_grad(weight_like(g_eff, w), w, m, need[1], need[3]);
  } else if (need_w) {
    g_w = g_eff;
  }
  return Grads4{empty_if_unused(need[0] ? g_x : at::Tensor(), x), empty_if_unused(g_w, x),
                empty_if_unused(need[2] ? g_bias : at::Tensor(), x), empty_if_unused(g_m, x)};
}

}  // namespace

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair) {
  check_masked_args(x, weight, bias, mask, weight_pair, 2);
  const int64_t rows = linear_rows(x, weight);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(weight.size(0));
  const at::Tensor y = LinearContraction{}.forward(x.reshape({rows, weight.size(1)}).contiguous(),
                                                   effective_weight(weight, mask, weight_pair), bias);
  return y.view(out_shape);
}

Grads4 masked_linear_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair,
                              std::array<bool, 4> output_mask) {
  check_masked_args(x, weight, c10::nullopt, mask, weight_pair, 2);
  check_like(grad, "grad", x, "x");
  const int64_t rows = linear_rows(x, weight);
  TORCH_CHECK(grad.dim() == x.dim() && grad.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                  grad.size(-1) == weight.size(0),
              "grad must have masked_linear's output shape, got ", grad.sizes());
  auto grads = backward(LinearContraction{}, grad.reshape({rows, weight.size(0)}),
                        x.reshape({rows, weight.size(1)}).contiguous(), weight, mask, weight_pair,
                        output_mask);
  if (output_mask[0]) std::get<0>(grads) = std::get<0>(grads).view(x.sizes());
  return grads;
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_masked_args(x, weight, bias, mask, weight_pair, 4);
  return conv(x, weight, stride, padding, dilation, groups)
      .forward(x, effective_weight(weight, mask, weight_pair), bias);
}

Grads4 masked_conv2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              std::array<bool, 4> output_mask) {
  check_masked_args(x, weight, c10::nullopt, mask, weight_pair, 4);
  check_like(grad, "grad", x, "x");
  const Conv2dContraction k = conv(x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "grad must have masked_conv2d's output shape, got ", grad.sizes());
  return backward(k, grad, x, weight, mask, weight_pair, output_mask);
}

}  // namespace robprune
