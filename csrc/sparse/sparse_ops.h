// The sparse family: the layers of pruned networks (schemas in pyext/module.cpp).
//
// masked_linear / masked_conv2d: the layer with weight * mask, y = x (W . M)^T + b, on the
// dense path: one ATen GEMM / convolution on the effective weight. weight_pair, when given,
// must be masked_weight_pair(weight, mask) (the Python wrappers pass the cached pair; only its
// first half is read). A mask of any values is applied as given: the masked modules keep it
// binary, and the compressed path checks it when it packs.
//
// The *_backward ops return (grad x, grad weight, grad bias, grad mask): the weight's gradient
// is the effective weight's times the mask (a pruned weight gets none), the mask's is the
// effective weight's times the weight (dense, so a pruned connection can come back); an entry
// whose output_mask flag is false comes back as an empty tensor.
#pragma once

#include <robprune/layer_args.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace robprune {

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair);

Grads4 masked_linear_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair,
                              std::array<bool, 4> output_mask);

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

Grads4 masked_conv2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              std::array<bool, 4> output_mask);

}  // namespace robprune
