// CROWN's backward step through an affine layer h' = (weight * mask) h + bias (schemas in
// pyext/module.cpp).
//
// crown_linear_backward: A (*, out_features) holds the coefficients of linear bounds in terms
// of h'. Returns (A (weight * mask) of shape (*, in_features), the bias term A bias of shape
// (*), zeros without a bias).
// crown_conv2d_backward: A (*, C_out, H_out, W_out); input_size (H_in, W_in) is the spatial
// size of the layer's input (a strided convolution maps several input sizes to one output
// size). Returns (the transposed convolution of A, (*, C_in, H_in, W_in), and the bias term
// sum over (c, y, x) of A[..., c, y, x] bias[c], of shape (*)).
// weight_pair: as for the interval ops, the cached masked_weight_pair(weight, mask); only its
// first half (weight * mask) is read. It is a cache, not differentiated.
//
// The *_grad ops return the gradients with respect to (A, weight, bias, mask) from those of the
// two outputs; an entry whose output_mask flag is false comes back as an empty tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace robprune {

using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> crown_linear_backward(
    const at::Tensor& A, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair);

Grads4 crown_linear_backward_grad(const at::Tensor& grad_A_out, const at::Tensor& grad_bias_term,
                                  const at::Tensor& A, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& weight_pair,
                                  std::array<bool, 4> output_mask);

std::tuple<at::Tensor, at::Tensor> crown_conv2d_backward(
    const at::Tensor& A, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair,
    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups);

Grads4 crown_conv2d_backward_grad(const at::Tensor& grad_A_out, const at::Tensor& grad_bias_term,
                                  const at::Tensor& A, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& weight_pair,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, std::array<bool, 4> output_mask);

}  // namespace robprune
