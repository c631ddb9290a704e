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
// which the transposed convolution is again one offset per kept weight. The geometry itself
// (ConvAxis, ConvLayout) is in sparse_geometry.h, which device code reads too.
#pragma once

#include "sparse_buffers.h"
#include "sparse_geometry.h"
#include "sparse_index.h"
#include "sparse_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace robprune {

// Elements after the last plane of a buffer that products read with overread (sparse_kernels.h):
// a tile's rows past the region (at most 16) and its vectors past a row (at most 8 of 16 lanes)
// reach that far beyond the last plane, never further.
inline int64_t slack(int64_t row) {
  return 18 * row + 128;
}

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
// scratch buffer (slots `slot` and the next) with slack(grid.cols) zeros after the planes, on
// x's device; bad: an invalid radius was met (box ops).
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
    out.bad = with_kernels(x, [&](auto k) { return decltype(k)::pack(p); });
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
