// A convolution's geometry as the compressed path lays it out (sparse_planes.h explains the phase
// planes). Callable on the host and on a device: the ops size their buffers with it, and the
// kernels that build a convolution's entry lists on the index's device (sparse_generic.h) place
// every kept weight with it.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace robprune {

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// One spatial axis of a convolution (see the top of sparse_planes.h).
struct ConvAxis {
  int64_t in, kernel, stride, pad, dil;
  C10_HOST_DEVICE int64_t out() const { return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1; }
  C10_HOST_DEVICE int64_t phase(int64_t i) const { return i * dil % stride; }
  C10_HOST_DEVICE int64_t shift(int64_t i) const { return i * dil / stride; }
  C10_HOST_DEVICE int64_t max_shift() const { return shift(kernel - 1); }
  // Rows of a phase plane: every padded input row, and every row an output reads.
  C10_HOST_DEVICE int64_t planes() const {
    const int64_t padded = ceil_div(in + 2 * pad, stride), read = out() + max_shift();
    return padded > read ? padded : read;
  }
  // Phase a's input rows are y = residue(a) + stride * k, k = 0, 1, ... (residue in [0,
  // stride)); the first sits at row first(a) of the phase plane. The transposed product writes
  // each phase's region(): the rows of the residue with the most (the others' last row past
  // the input is dropped).
  C10_HOST_DEVICE int64_t residue(int64_t a) const { return ((a - pad) % stride + stride) % stride; }
  C10_HOST_DEVICE int64_t first(int64_t a) const { return (residue(a) + pad) / stride; }
  C10_HOST_DEVICE int64_t region() const { return ceil_div(in, stride); }
};

// A convolution's geometry and the sizes of its planes. Input planes: (images, in_channels,
// stride_h, stride_w, rows_q, cols_q). Gradient planes: (images, out_channels, rows_g, cols_g),
// the output gradient at rows [max_shift_h, + out_h) and columns [max_shift_w, + out_w).
struct ConvLayout {
  int64_t images, in_channels, out_channels, groups;
  ConvAxis h, w;

  C10_HOST_DEVICE int64_t phases() const { return h.stride * w.stride; }
  C10_HOST_DEVICE int64_t in_per_group() const { return in_channels / groups; }
  C10_HOST_DEVICE int64_t out_per_group() const { return out_channels / groups; }
  C10_HOST_DEVICE int64_t columns() const { return in_per_group() * h.kernel * w.kernel; }  // of W2
  C10_HOST_DEVICE int64_t rows_q() const { return h.planes(); }
  C10_HOST_DEVICE int64_t cols_q() const { return w.planes(); }
  C10_HOST_DEVICE int64_t plane_q() const { return rows_q() * cols_q(); }
  C10_HOST_DEVICE int64_t rows_g() const { return rows_q() + h.max_shift(); }
  C10_HOST_DEVICE int64_t cols_g() const { return cols_q() + w.max_shift(); }
  C10_HOST_DEVICE int64_t plane_g() const { return rows_g() * cols_g(); }

  // Where kept weight (o, col) of W2 reads its input plane, col = (c / groups, i, j).
  C10_HOST_DEVICE int64_t forward_offset(int64_t o, int64_t col) const {
    const int64_t taps = h.kernel * w.kernel, i = col % taps / w.kernel, j = col % w.kernel;
    const int64_t c = o / out_per_group() * in_per_group() + col / taps;
    return ((c * h.stride + h.phase(i)) * w.stride + w.phase(j)) * plane_q() + h.shift(i) * cols_q() +
           w.shift(j);
  }

  // Transposed channel ch = (c, a, b) (phase (a, b) of input channel c): the offset into the
  // gradient planes at which the kept weight (o, c, i, j), of phases (a, b), reads channel o
  // shifted back by its tap (the adjoint of its forward offset), for the first element of the
  // phase's region (the input's rows and columns of that phase, not its padding).
  C10_HOST_DEVICE int64_t transposed_offset(int64_t o, int64_t i, int64_t j) const {
    return o * plane_g() + (h.max_shift() - h.shift(i) + h.first(h.phase(i))) * cols_g() + w.max_shift() -
           w.shift(j) + w.first(w.phase(j));
  }
  // A phase's region in the transposed product's result: (images, in_channels, stride_h,
  // stride_w, region_rows, region_cols); for stride 1, the input itself.
  C10_HOST_DEVICE int64_t region_rows() const { return h.region(); }
  C10_HOST_DEVICE int64_t region_cols() const { return w.region(); }
};

}  // namespace robprune
