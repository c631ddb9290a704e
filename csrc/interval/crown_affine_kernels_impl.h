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
  // Rows of the flat buffer along which the channel is fixed (NCHW: one (row, channel) plane)
  // or along which it runs (channels_last, and linear layers: one pixel's channels).
  const int64_t rows = A.size(0), channels = A.size(1), plane = A.numel() / std::max<int64_t>(rows * channels, 1);
  const bool per_row_channel = A.dim() == 4 && A.is_contiguous() && plane > 1;
  const int64_t flat_rows = per_row_channel ? rows * channels : rows * plane;
  at::Tensor sums = at::empty({flat_rows}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "robprune_crown_bias_term", [&] {
    const scalar_t *a = A.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    scalar_t* out = sums.data_ptr<scalar_t>();
    if (per_row_channel)
      Backend::rows_sum(flat_rows, plane, crown::BiasDot<scalar_t, true>{a, b, plane, channels}, out);
    else
      Backend::rows_sum(flat_rows, channels, crown::BiasDot<scalar_t, false>{a, b, channels, channels}, out);
  });
  // The partial sums (per (row, channel) or per pixel) are a small fraction of A: summing them
  // per row is cheap beside the pass over A.
  return plane > 1 ? sums.view({rows, -1}).sum(1) : sums;
}

}  // namespace robprune
