// Per-element formula of the bias term of CROWN's backward step through an affine layer, for
// CPU and CUDA alike. Walking a linear bound A h' (h' = W h + b) back to A W h + A b adds the
// bias term sum over output neurons of A * b, where b is per channel.
// reference.py holds the same formula in plain torch; keep the two in step.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace robprune::crown {

// Row functor for Backend::rows_sum over A's flat buffer cut into rows of `cols` elements.
// PER_ROW_CHANNEL (NCHW conv layers): a row is one channel plane, so the channel is fixed
// along it and its bias is read once per row. Otherwise (linear layers, channels_last conv
// layers): a row lists the channels of one pixel, element j being channel j.
template <class T, bool PER_ROW_CHANNEL>
struct BiasDot {
  const T* A;
  const T* bias;
  int64_t cols, channels;

  struct Row {
    const T* a;
    const T* bias;
    T row_bias;
    C10_HOST_DEVICE T operator()(int64_t j) const { return a[j] * (PER_ROW_CHANNEL ? row_bias : bias[j]); }
  };
  C10_HOST_DEVICE Row row(int64_t r) const {
    return {A + r * cols, bias, PER_ROW_CHANNEL ? bias[r % channels] : T(0)};
  }
};

}  // namespace robprune::crown
