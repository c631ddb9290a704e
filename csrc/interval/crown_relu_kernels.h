// CROWN's backward step through a ReLU (crown_relu_math.h), one static function per pass.
// Declared for any backend, defined in crown_relu_kernels_impl.h, instantiated beside the box
// kernels in interval_kernels_cpu.cpp and interval_kernels_cuda.cu.
//
// Arguments are dense and contiguous, already flattened: A (Ba, S, N) with Ba in {1, B},
// lower and upper (B, N).
#pragma once

#include <robprune/backend.h>

#include <ATen/core/Tensor.h>

#include <tuple>

namespace robprune {

template <class Backend>
struct CrownReluKernels {
  // Whether lower <= upper holds everywhere (false on any NaN).
  static bool ordered(const at::Tensor& lower, const at::Tensor& upper);
  // (A' of shape (B, S, N), bias of shape (B, S)).
  static std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& A, const at::Tensor& lower,
                                                 const at::Tensor& upper, bool upper_side);
  // (grad A of shape (B, S, N) before any sum over a shared A, grad lower, grad upper).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> step_grad(
      const at::Tensor& grad_out, const at::Tensor& grad_bias, const at::Tensor& A,
      const at::Tensor& lower, const at::Tensor& upper, bool upper_side);
};

}  // namespace robprune
