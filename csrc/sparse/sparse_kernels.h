// The compressed path's kernels: products with a weight kept as a list of (value, input offset)
// entries per output channel, so that one loop serves a linear layer, a convolution and their
// transposes. The ops (sparse_ops.cpp) turn the compressed weight (CSR rows, CSC columns) and
// the layer's geometry into these problems; the kernels know nothing of layers.
//
// Every operand is a stack of planes: plane (n, o) of a buffer starts at n * image + o * channel
// and holds `rows` rows of `cols` contiguous elements, `row` apart. A linear layer is the case of
// one image and one-row planes, its batch along the row (the ops transpose x to (in, N) so that
// the batch is contiguous); a convolution's planes are the zero-padded channel images of one
// sample (stride-s convolutions split each into s x s phase images, see sparse_planes.h), in
// which every kept weight reads its input plane shifted by a fixed offset.
//
// Declared for any backend, defined for the CPU in sparse_cpu.cpp (SIMD over a plane's rows,
// threads over images, channels and row blocks); the ops run on the CPU only for now.
#pragma once

#include <robprune/backend.h>

#include <cstdint>

namespace robprune {

// out[n, o] = bias[o] + sum_{e in o's entries} w[e] * in[n][off[e] + region] over the region
// (rows x cols) of plane (n, o): in a plane of `in` the region starts at off[e] and its rows are
// in_row apart. With interval, a second product runs in the same pass over the entries:
// out1 = sum |w[e]| in1[...] (the radius of a box; the bias goes to out, the centre), and
// out_bounds stores (out - out1, out + out1) instead (a box's lower and upper bound).
//
// overread: `in` is a buffer of the ops' own with room past every plane (see slack() in
// sparse_planes.h), so the kernel may read whole vectors and rows past the region and throw
// the extra lanes away; without it, the kernel reads exactly the region (slower tails).
template <class T>
struct Product {
  int64_t images = 1, channels = 0, rows = 1, cols = 0;
  const int32_t* start = nullptr;  // [channels + 1]: channel o's entries are [start[o], start[o+1])
  const T* w = nullptr;            // [entries]
  const int64_t* off = nullptr;    // [entries]
  const T* in = nullptr;
  const T* in1 = nullptr;
  int64_t in_image = 0, in_row = 0;
  T* out = nullptr;
  T* out1 = nullptr;
  int64_t out_image = 0, out_channel = 0, out_row = 0;
  const T* bias = nullptr;  // [channels] or null
  bool interval = false, out_bounds = false, overread = false;
  // One-row planes (a linear layer: one image, one row) give index instead of off: entry e
  // reads input row index[e], at offset index[e] * index_stride. The kernel then walks the
  // batch in chunks that keep the input in cache, and writes the result transposed: element
  // (o, c) at out[c * out_row + o], the layer's (batch, features) layout.
  bool indexed = false;
  const int32_t* index = nullptr;
  int64_t index_stride = 0;
  int64_t index_rows = 0;  // rows of the input (of each operand), which sizes the chunks
  // Optional, for one-row planes without interval: in the same pass, the dot product of every
  // entry's input row with its channel's own row of `self` (channel o's at self + o * self_row),
  // stored to dw[perm[e]]. A linear layer's input gradient (in: the output gradient, channels:
  // the inputs over the CSC) thus also gives its weights' gradient (self: the layer's input).
  const T* self = nullptr;
  int64_t self_row = 0;
  T* dw = nullptr;
  const int32_t* perm = nullptr;
};

// The gradient of a Product with respect to its entries' values, given the gradient g of its
// output: dw[e] = sum_n sum_region g[n, o(e)] * in[n][off[e] + region] (+ sign(w[e]) times the
// same sum of g1 and in1 with interval: the radius product multiplies by |w|). Reads exactly
// the region of both operands (no overread).
template <class T>
struct Dot {
  int64_t images = 1, channels = 0, rows = 1, cols = 0;
  const int32_t* start = nullptr;
  const T* w = nullptr;  // read for its sign with interval only
  const int64_t* off = nullptr;
  const T* g = nullptr;
  const T* g1 = nullptr;
  int64_t g_image = 0, g_channel = 0, g_row = 0;
  const T* in = nullptr;
  const T* in1 = nullptr;
  int64_t in_image = 0, in_row = 0;
  T* dw = nullptr;  // [entries]
  bool interval = false;
  // As Product's (indexed): offsets index[e] * index_stride instead of off; entry e's weight
  // w[perm[e]] and its gradient dw[perm[e]] (a CSC walked for CSR-ordered values).
  bool indexed = false;
  const int32_t* index = nullptr;
  int64_t index_stride = 0;
  const int32_t* perm = nullptr;
};

// What a Pack computes per element pair, from (x0, x1) to (y0, y1): a copy of one operand; an
// input box (centre, radius) through ReLU, checking the radius; a box without ReLU, checking the
// radius; the gradient of (lower, upper) turned into that of (centre, radius).
enum class PackOp { kCopy, kReluBox, kCheckBox, kBoundsGrad };

// Rewrites a stack of images (images x channels x height x width, any strides) as the zero
// padded (phase) planes the products read: plane (n, c, a, b) of the output holds, at (r, q),
// x[n, c, r * stride_h + a - top, q * stride_w + b - left], or 0 outside the image. The planes
// are (out_rows x out_cols), contiguous, in the order (n, c, a, b). A linear layer's
// transpose is the case images 1, height 1, width N. Returns whether any radius was invalid
// (negative or NaN) with the box ops.
template <class T>
struct Pack {
  int64_t images = 1, channels = 0, height = 1, width = 0;
  const T* x = nullptr;
  const T* x1 = nullptr;  // the second operand of the pair ops, strided like x
  int64_t x_image = 0, x_channel = 0, x_row = 0, x_col = 0;
  int64_t stride_h = 1, stride_w = 1, top = 0, left = 0, out_rows = 0, out_cols = 0;
  T* out = nullptr;
  T* out1 = nullptr;
  PackOp op = PackOp::kCopy;
};

template <class Backend>
struct SparseKernels {
  template <class T>
  static void product(const Product<T>& p);
  template <class T>
  static void dot(const Dot<T>& p);
  template <class T>
  static bool pack(const Pack<T>& p);
  // The index checks (sparse_index.h), on data of the backend's device: whether every one of
  // the `segments` segments of ptr holds strictly increasing inner indices in [0, limit); whether
  // all n indices lie in [0, limit).
  static bool sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner, int64_t limit);
  static bool in_range(const int32_t* index, int64_t n, int64_t limit);
};

// The CPU's, explicit specialisations defined in sparse_cpu.cpp for float and double.
template <>
template <class T>
void SparseKernels<CpuBackend>::product(const Product<T>& p);
template <>
template <class T>
void SparseKernels<CpuBackend>::dot(const Dot<T>& p);
template <>
template <class T>
bool SparseKernels<CpuBackend>::pack(const Pack<T>& p);
template <>
bool SparseKernels<CpuBackend>::sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner,
                                                 int64_t limit);
template <>
bool SparseKernels<CpuBackend>::in_range(const int32_t* index, int64_t n, int64_t limit);

}  // namespace robprune
