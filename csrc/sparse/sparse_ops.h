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
//
// The compressed path (sparse_*): the same layers with the weight as its kept values and their
// indices (sparse_index.h: CSR row_ptr / col, CSC col_ptr / row / csc_to_csr, int32), so the
// work scales with the kept weights. On CPU and CUDA tensors (every tensor of a call on one
// device): SIMD kernels on the CPU, the generic kernels of sparse_generic.h on a GPU (and on the
// CPU under ROBPRUNE_SIMD=generic). Every op reads its float operands in any layout and returns
// what ATen's layer would (contiguous; a convolution's output in its input's memory format).
//
//   sparse_linear           y = x W^T + b, x (N, in), W the CSR's (out_features, in)
//   sparse_linear_t         g W, g (N, out): the input gradient, and CROWN's step through W
//   sparse_linear_values_grad   per kept weight k, sum_n g[n, row_k] x[n, col_k] (given the
//                           CSC, its fastest order; the result in the values' order)
//   sparse_linear_backward  sparse_linear's (grad x, grad values), both in one pass over the
//                           CSC (each of grad's rows read once for both)
//   sparse_conv2d / _t / _values_grad   the same for a convolution (the transpose is the
//                           transposed convolution back to input_size), W of shape
//                           (out, C_in / groups, kernel_size)
//   sparse_gather           a weight's kept values, values[e] = W2[row of e, col[e]] (W2 =
//                           weight.view(out, -1), in logical order whatever its strides)
//   sparse_scatter_         writes all of out (contiguous, W2 = out.view(out, -1)): the values
//                           at their entries, zeros elsewhere (the gather's gradient, in place
//                           so the caller may reuse memory the kernel already has mapped)
//   sparse_interval_linear / _conv2d    the box (W c + b, |W| r) of an input box, in one pass
//                           over the kept weights, optional ReLU on the input box (relu_in),
//                           optional (lower, upper) output (out_bounds), the radius checked
//                           unless check_radius is false; their _backward ops return the
//                           gradients of (center, radius, values, bias), empty where not asked.
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

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col, int64_t out_features);

at::Tensor sparse_linear_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& row, const at::Tensor& csc_to_csr, int64_t in_features);

at::Tensor sparse_linear_values_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& col_ptr,
                                     const at::Tensor& row, const at::Tensor& csc_to_csr);

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups);

at::Tensor sparse_conv2d_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& row, const at::Tensor& csc_to_csr, at::IntArrayRef input_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups);

at::Tensor sparse_conv2d_values_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& row_ptr,
                                     const at::Tensor& col, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& values, const at::Tensor& col_ptr,
                                                          const at::Tensor& row, const at::Tensor& csc_to_csr,
                                                          std::array<bool, 2> output_mask);

at::Tensor sparse_gather(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col);

void sparse_scatter_(const at::Tensor& out, const at::Tensor& values, const at::Tensor& row_ptr,
                     const at::Tensor& col);

std::tuple<at::Tensor, at::Tensor> sparse_interval_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& values,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_ptr, const at::Tensor& col,
    int64_t out_features, bool relu_in, bool out_bounds, bool check_radius);

Grads4 sparse_interval_linear_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                       const at::Tensor& center, const at::Tensor& radius,
                                       const at::Tensor& values, const at::Tensor& row_ptr,
                                       const at::Tensor& col, const at::Tensor& col_ptr,
                                       const at::Tensor& row, const at::Tensor& csc_to_csr, bool relu_in,
                                       bool out_bounds, std::array<bool, 4> output_mask);

std::tuple<at::Tensor, at::Tensor> sparse_interval_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& values,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_ptr, const at::Tensor& col,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu_in, bool out_bounds, bool check_radius);

Grads4 sparse_interval_conv2d_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                       const at::Tensor& center, const at::Tensor& radius,
                                       const at::Tensor& values, const at::Tensor& row_ptr,
                                       const at::Tensor& col, const at::Tensor& col_ptr,
                                       const at::Tensor& row, const at::Tensor& csc_to_csr,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                       bool relu_in, bool out_bounds, std::array<bool, 4> output_mask);

}  // namespace robprune
