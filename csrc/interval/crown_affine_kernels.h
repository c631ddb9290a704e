// The elementwise kernel of CROWN's backward step through an affine layer
// (crown_affine_math.h). Declared for any backend, defined in crown_affine_kernels_impl.h,
// instantiated beside the box kernels in interval_kernels_cpu.cpp and interval_kernels_cuda.cu.
#pragma once

#include <robprune/backend.h>

#include <ATen/core/Tensor.h>

namespace robprune {

template <class Backend>
struct CrownAffineKernels {
  // A (rows, channels) or (rows, channels, H, W), dense (contiguous or channels_last), bias
  // (channels,): the (rows,) sums sum_{c, y, x} A[row, c, y, x] * bias[c], in one pass over A.
  static at::Tensor bias_term(const at::Tensor& A, const at::Tensor& bias);
};

}  // namespace robprune
