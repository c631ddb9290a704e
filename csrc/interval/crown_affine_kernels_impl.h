// Definition of CrownAffineKernels<Backend>: allocate, dispatch on dtype, run the
// crown_affine_math.h functor through the backend. Included only by the per-backend units.
#pragma once

#include "crown_affine_kernels.h"
#include "crown_affine_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

namespace robprune {

template <class Backend>
at::Tensor CrownAffineKernels<Backend>::bias_term(const at::Tensor& A, const at::Tensor& bias) {
  const int64_t rows = A.size(0), channels = A.size(1), plane = A.size(2);
  const bool per_row_channel = plane > 1;
  at::Tensor sums = at::empty({per_row_channel ? rows * channels : rows}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "robprune_crown_bias_term", [&] {
    const scalar_t *a = A.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    scalar_t* out = sums.data_ptr<scalar_t>();
    if (per_row_channel)
      Backend::rows_sum(rows * channels, plane, crown::BiasDot<scalar_t, true>{a, b, plane, channels}, out);
    else
      Backend::rows_sum(rows, channels, crown::BiasDot<scalar_t, false>{a, b, channels, channels}, out);
  });
  // The per-(row, channel) partial sums of a conv layer are rows * channels numbers: summing
  // them is small beside the pass over A.
  return per_row_channel ? sums.view({rows, channels}).sum(1) : sums;
}

}  // namespace robprune
