// The CROWN family's operators, as registered in pyext/module.cpp (schemas there): CROWN's
// backward steps, which walk the coefficients A of linear bounds back through one layer.
//
// crown_relu_backward: the step through y = relu(z) given l <= z <= u. A (Ba, S, *neurons)
// holds the coefficients of S linear bounds in terms of y, Ba = 1 (shared by the batch) or B;
// lower, upper (B, *neurons). Returns the coefficients in terms of z, (B, S, *neurons), and the
// bias the relaxation adds, (B, S). upper_side: the walk bounds from above (positive
// coefficients take ReLU's upper line), else from below.
//
// The steps through an affine layer h' = (weight * mask) h + bias:
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
// The *_grad ops return the gradients of a step with respect to its tensor inputs ((A, lower,
// upper) through a ReLU, (A, weight, bias, mask) through an affine layer) from those of its two
// outputs; an affine step's entry whose output_mask flag is false comes back as an empty tensor.
#pragma once

#include <robprune/layer_args.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace robprune {

std::tuple<at::Tensor, at::Tensor> crown_relu_backward(const at::Tensor& A, const at::Tensor& lower,
                                                       const at::Tensor& upper, bool upper_side);

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_backward_grad(
    const at::Tensor& grad_A_out, const at::Tensor& grad_bias, const at::Tensor& A,
    const at::Tensor& lower, const at::Tensor& upper, bool upper_side);

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
