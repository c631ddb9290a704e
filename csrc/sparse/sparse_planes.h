// The layouts the compressed products read and write (sparse_kernels.h): a linear layer's
// operands with the batch contiguous, and a convolution's zero-padded phase planes, in which
// every kept weight is one fixed offset.
//
// Convolution, per spatial axis (input size `in`, kernel k, stride s, padding p, dilation d):
// tap i reads padded input row po * s + i * d for output row po. Split the padded input into s
// phases by row (phase a holds padded rows a, a + s, a + 2s, ...): tap i reads phase
// (i * d) % s at row po + (i * d) / s, a shift by a constant. So a strided convolution is a sum
// of stride-1 products over phase planes, each kept weight (o, c, i, j) an offset into plane
// (c, phase(i), phase(j)); the products never test a border, the zeros are in the planes. The
// output's gradient gets the mirror layout (zero margins before the data, max shift wide), in
// which the transposed convolution is again one offset per kept weight.
#pragma once

#include "sparse_index.h"
#include "sparse_kernels.h"
#include "sparse_buffers.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

namespace robprune {

using CpuSparseKernels = SparseKernels<CpuBackend>;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Elements after the last plane of a buffer that products read with overread (sparse_kernels.h):
// a tile's rows past the region (at most 16) and its vectors past a row (at most 8 of 16 lanes)
// reach that far beyond the last plane, never further.
inline int64_t slack(int64_t row) {
  return 18 * row + 128;
}

// One spatial axis of a convolution (see the top of this file).
struct ConvAxis {
  int64_t in, kernel, stride, pad, dil;
  int64_t out() const { return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1; }
  int64_t phase(int64_t i) const { return i * dil % stride; }
  int64_t shift(int64_t i) const { return i * dil / stride; }
  int64_t max_shift() const { return shift(kernel - 1); }
  // Rows of a phase plane: every padded input row, and every row an output reads.
  int64_t planes() const { return std::max(ceil_div(in + 2 * pad, stride), out() + max_shift()); }
};

// A convolution's geometry and the sizes of its planes. Input planes: (images, in_channels,
// stride_h, stride_w, rows_q, cols_q). Gradient planes: (images, out_channels, rows_g, cols_g),
// the output gradient at rows [max_shift_h, + out_h) and columns [max_shift_w, + out_w).
struct ConvLayout {
  int64_t images, in_channels, out_channels, groups;
  ConvAxis h, w;

  int64_t phases() const { return h.stride * w.stride; }
  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  int64_t columns() const { return in_per_group() * h.kernel * w.kernel; }  // of W2
  int64_t rows_q() const { return h.planes(); }
  int64_t cols_q() const { return w.planes(); }
  int64_t plane_q() const { return rows_q() * cols_q(); }
  int64_t rows_g() const { return rows_q() + h.max_shift(); }
  int64_t cols_g() const { return cols_q() + w.max_shift(); }
  int64_t plane_g() const { return rows_g() * cols_g(); }

  // Where kept weight (o, col) of W2 reads its input plane, col = (c / groups, i, j).
  int64_t forward_offset(int64_t o, int64_t col) const {
    const int64_t taps = h.kernel * w.kernel, i = col % taps / w.kernel, j = col % w.kernel;
    const int64_t c = o / out_per_group() * in_per_group() + col / taps;
    return ((c * h.stride + h.phase(i)) * w.stride + w.phase(j)) * plane_q() + h.shift(i) * cols_q() +
           w.shift(j);
  }
};

// How to read an operand as (images, channels, height, width) with strides.
struct PlaneView {
  int64_t images, channels, height, width;
  int64_t s_image, s_channel, s_row, s_col;
};

inline PlaneView conv_view(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// x (N, F) as F one-row planes of the batch: a linear layer's operand transposed.
inline PlaneView batch_view(const at::Tensor& x) {
  return {1, x.size(1), 1, x.size(0), 0, x.stride(1), 0, x.stride(0)};
}

// The planes a Pack writes (sparse_kernels.h): the phases, the margins before the data, and
// each plane's size.
struct PlaneGrid {
  int64_t stride_h = 1, stride_w = 1, top = 0, left = 0, rows = 1, cols = 0;
};

// The planes of x (and of x1, read with x's strides: a pair laid out alike), each a flat
// scratch buffer (slots `slot` and the next) with slack(grid.cols) zeros after the planes;
// bad: an invalid radius was met (box ops).
struct Planes {
  at::Tensor a, b;
  bool bad = false;
};

inline Planes pack_planes(const at::Tensor& x, const at::Tensor& x1, const PlaneView& v, const PlaneGrid& g,
                          PackOp op, Scratch slot) {
  const int64_t n = v.images * v.channels * g.stride_h * g.stride_w * g.rows * g.cols;
  const int64_t extra = slack(g.cols);
  Planes out;
  out.a = scratch(slot, n + extra, x.options());
  out.a.narrow(0, n, extra).zero_();
  if (x1.defined()) {
    out.b = scratch(static_cast<Scratch>(static_cast<int>(slot) + 1), n + extra, x.options());
    out.b.narrow(0, n, extra).zero_();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "robprune_sparse_pack", [&] {
    Pack<scalar_t> p;
    p.images = v.images;
    p.channels = v.channels;
    p.height = v.height;
    p.width = v.width;
    p.x = x.const_data_ptr<scalar_t>();
    p.x1 = x1.defined() ? x1.const_data_ptr<scalar_t>() : nullptr;
    p.x_image = v.s_image;
    p.x_channel = v.s_channel;
    p.x_row = v.s_row;
    p.x_col = v.s_col;
    p.stride_h = g.stride_h;
    p.stride_w = g.stride_w;
    p.top = g.top;
    p.left = g.left;
    p.out_rows = g.rows;
    p.out_cols = g.cols;
    p.out = out.a.mutable_data_ptr<scalar_t>();
    p.out1 = x1.defined() ? out.b.mutable_data_ptr<scalar_t>() : nullptr;
    p.op = op;
    out.bad = CpuSparseKernels::pack(p);
  });
  return out;
}

// x1 with x's strides (a copy when they differ), so that one Pack reads both.
inline at::Tensor strided_like(const at::Tensor& x1, const at::Tensor& x) {
  return x1.strides() == x.strides() ? x1 : at::empty_like(x).copy_(x1);
}

// The input planes of a convolution (and of the second operand of a pair).
inline Planes input_planes(const at::Tensor& x, const at::Tensor& x1, const ConvLayout& l, PackOp op) {
  return pack_planes(x, x1.defined() ? strided_like(x1, x) : x1, conv_view(x),
                     {l.h.stride, l.w.stride, l.h.pad, l.w.pad, l.rows_q(), l.cols_q()}, op, Scratch::kInput);
}

// The gradient planes of a convolution's output gradient (and of the second operand).
inline Planes gradient_planes(const at::Tensor& g, const at::Tensor& g1, const ConvLayout& l, PackOp op) {
  return pack_planes(g, g1.defined() ? strided_like(g1, g) : g1, conv_view(g),
                     {1, 1, l.h.max_shift(), l.w.max_shift(), l.rows_g(), l.cols_g()}, op, Scratch::kGradient);
}

// A linear layer's operands (N, F) with the batch contiguous: F rows of N, ld apart. ld is N
// rounded up to 64 bytes (aligned rows) and never a multiple of 512 bytes (rows that far apart
// would share the same few cache sets); the rows' tails are zeros.
inline int64_t batch_ld(int64_t n, int64_t element_size) {
  const int64_t per_line = 64 / element_size;
  int64_t ld = ceil_div(n, per_line) * per_line;
  if (ld * element_size % 512 == 0) ld += per_line;
  return ld;
}

struct Batch {
  Planes rows;
  int64_t ld;
};

// x (and x1, laid out alike after strided_like) through a Pack op, as batch-contiguous rows
// in scratch slots from `slot` on (kInput for a layer's input, kGradient for its output's
// gradient).
inline Batch batch_rows(const at::Tensor& x, const at::Tensor& x1, PackOp op, Scratch slot) {
  const int64_t ld = batch_ld(x.size(0), x.element_size());
  return {pack_planes(x, x1.defined() ? strided_like(x1, x) : x1, batch_view(x), {1, 1, 0, 0, 1, ld}, op, slot), ld};
}

}  // namespace robprune
