// crown_relu_backward: CROWN's backward step through y = relu(z) given l <= z <= u (schema in
// pyext/module.cpp). A (Ba, S, *neurons) holds the coefficients of S linear bounds in terms of
// y, Ba = 1 (shared by the batch) or B; lower, upper (B, *neurons). Returns the coefficients in
// terms of z, (B, S, *neurons), and the bias the relaxation adds, (B, S). upper_side: the walk
// bounds from above (positive coefficients take ReLU's upper line), else from below.
//
// crown_relu_backward_grad: its gradient with respect to (A, lower, upper).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace robprune {

std::tuple<at::Tensor, at::Tensor> crown_relu_backward(const at::Tensor& A, const at::Tensor& lower,
                                                       const at::Tensor& upper, bool upper_side);

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_backward_grad(
    const at::Tensor& grad_A_out, const at::Tensor& grad_bias, const at::Tensor& A,
    const at::Tensor& lower, const at::Tensor& upper, bool upper_side);

}  // namespace robprune
