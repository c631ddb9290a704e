// The compressed path's kernels: products with a weight kept as a list of (value, input offset)
// entries per output channel, so that one loop serves a linear layer, a convolution and their
// transposes. The ops (sparse_ops.cpp) turn the compressed weight (CSR rows, CSC columns) and
// the layer's geometry into these problems; the products know nothing of layers (only the
// kernels that build a convolution's entry lists do).
//
// Every operand is a stack of planes: plane (n, o) of a buffer starts at n * image + o * channel
// and holds `rows` rows of `cols` contiguous elements, `row` apart. A linear layer is the case of
// one image and one-row planes, its batch along the row (the ops transpose x to (in, N) so that
// the batch is contiguous); a convolution's planes are the zero-padded channel images of one
// sample (stride-s convolutions split each into s x s phase images, see sparse_planes.h), in
// which every kept weight reads its input plane shifted by a fixed offset.
//
// Declared for any backend. sparse_generic.h writes every kernel once, as C10_HOST_DEVICE
// functors over a Backend's loops (one thread per output element), instantiated for CUDA in
// sparse_cuda.cu and for the CPU in sparse_cpu.cpp. On the CPU, SIMD kernels (sparse_cpu.cpp:
// vectors over a plane's rows, threads over images, channels and row blocks) replace the generic
// product, dot, pack and index checks, unless ROBPRUNE_SIMD=generic asks for the generic ones
// (which is how the CUDA kernels' logic is tested on a machine without a GPU). The ops run on
// CPU and CUDA tensors alike, each with its device's kernels (with_kernels below).
#pragma once

#include "sparse_geometry.h"

#include <robprune/backend.h>

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace robprune {

// What a Product and a Dot share: the channels' entry lists and the operand the entries read.
// Channel o's entries are [start[o], start[o + 1]); entry e reads its region (rows x cols) of
// image n of `in` (and of in1 with interval) at off[e], rows in_row apart, images in_image apart.
// One-row planes (a linear layer: one image, one row) may give index instead of off (indexed):
// entry e reads input row index[e], at offset index[e] * index_stride. Where perm is given (a
// CSC walked over CSR-ordered values), entry e's weight is w[perm[e]] and a weights' gradient
// (dw, [entries]) stores entry e's at dw[perm[e]]; else w[e] and dw[e]. (Reading the weights
// through perm costs the kernels one load per entry; putting them in the CSC's order first
// cost a pass of random reads as long as a linear layer's whole weight gradient.)
template <class T>
struct EntryLists {
  int64_t images = 1, channels = 0, rows = 1, cols = 0;
  const int32_t* start = nullptr;  // [channels + 1]
  int64_t entries = 0;             // start[channels], which a device's kernels cannot read on the host
  const int64_t* off = nullptr;    // [entries]
  const T* in = nullptr;
  const T* in1 = nullptr;
  int64_t in_image = 0, in_row = 0;
  bool interval = false;
  bool indexed = false;
  const int32_t* index = nullptr;
  int64_t index_stride = 0;
  const int32_t* perm = nullptr;
  T* dw = nullptr;
};

// out[n, o] = bias[o] + sum_{e in o's entries} w[e] * in[n][off[e] + region] over the region
// of plane (n, o). With interval, a second product runs in the same pass over the entries:
// out1 = sum |w[e]| in1[...] (the radius of a box; the bias goes to out, the centre), and
// out_bounds stores (out - out1, out + out1) instead (a box's lower and upper bound).
//
// overread: `in` is a buffer of the ops' own with room past every plane (see slack() in
// sparse_planes.h), so the CPU kernels may read whole vectors and rows past the region and throw
// the extra lanes away; without it, they read exactly the region (slower tails). The generic
// kernels read exactly the region either way.
template <class T>
struct Product : EntryLists<T> {
  const T* w = nullptr;  // [entries], through perm where given
  T* out = nullptr;
  T* out1 = nullptr;
  int64_t out_image = 0, out_channel = 0, out_row = 0;
  const T* bias = nullptr;  // [channels] or null
  bool out_bounds = false, overread = false;
  // Indexed, the kernel walks the batch in chunks that keep the input in cache, and writes the
  // result transposed: element (o, c) at out[c * out_row + o], the layer's (batch, features)
  // layout.
  int64_t index_rows = 0;  // rows of the input (of each operand), which sizes the chunks
  // Indexed, the input's columns are col_stride apart: 1 where the ops transposed a linear
  // layer's input (the batch contiguous), in_features where they read it as it is, a sample per
  // column (a small batch, which the vectors over the batch would leave mostly empty).
  int64_t col_stride = 1;
  // Optional, for one-row planes: in the same pass, the dot product of every entry's input row
  // with its channel's own row of `self` (channel o's at self + o * self_row), stored to dw; with
  // interval, plus sign(w) times that of its row of in1 with the own row of self1 (as a Dot's).
  // A linear layer's input gradient (in: the output gradient, channels: the inputs over the CSC)
  // thus also gives its weights' gradient (self: the layer's input), each output gradient row
  // loaded once for both.
  const T* self = nullptr;
  const T* self1 = nullptr;
  int64_t self_row = 0;
};

// The gradient of a Product with respect to its entries' values, given the gradient g of its
// output: dw[e] = sum_n sum_region g[n, o(e)] * in[n][off[e] + region] (+ sign(w[e]) times the
// same sum of g1 and in1 with interval: the radius product multiplies by |w|). Reads exactly
// the region of both operands (no overread).
template <class T>
struct Dot : EntryLists<T> {
  const T* w = nullptr;  // read for its sign with interval only; entry e's is w[perm[e]] with perm
  const T* g = nullptr;
  const T* g1 = nullptr;
  int64_t g_image = 0, g_channel = 0, g_row = 0;
  // Optional: db[o] = sum_n sum_region g[n, o], a convolution's bias gradient, in the same pass
  // over g (which the CPU's kernels then read from cache, not memory, a second time).
  T* db = nullptr;
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

// The inverse of a stride's phase split, for what a strided convolution's transposed product
// writes: per input channel, the regions of its phases (a, b) (ConvLayout::transposed_offset),
// (images, channels, stride_h, stride_w, rows, cols), contiguous. Element (n, c, y, x) of out
// (images x channels x height x width, contiguous) is row y / stride_h, column x / stride_w of
// the region of the phase whose residue (ConvAxis::residue) is (y % stride_h, x % stride_w).
// A pair (z, z1) -> (out, out1); with a box (center, radius, contiguous like out), the pair's
// gradient through the box's ReLU instead (interval::PrologueBackward), in the same pass.
template <class T>
struct Unphase {
  int64_t images = 1, channels = 0, height = 0, width = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, rows = 0, cols = 0;
  const T* z = nullptr;
  const T* z1 = nullptr;
  const T* center = nullptr;
  const T* radius = nullptr;
  T* out = nullptr;
  T* out1 = nullptr;
};

// A layer's weight W2 (rows x cols, contiguous) and its kept values in the CSR's order (row_ptr
// [rows + 1], col [entries], checked): gather reads values from W2, scatter writes all of W2 (the
// values at their entries, zeros elsewhere: a pruned weight's gradient, made in one pass).
template <class T>
struct Kept {
  int64_t rows = 0, cols = 0, entries = 0;
  const int32_t* row_ptr = nullptr;
  const int32_t* col = nullptr;
  T* dense = nullptr;
  T* values = nullptr;
};

// A convolution's compressed weight, from which the ops build the entry lists of its products
// (sparse_ops.cpp) on the index's device: the CSR (ptr = row_ptr, inner = col) for the forward
// product, the CSC (ptr = col_ptr, inner = row, perm = csc_to_csr) for the transposed one.
struct ConvIndex {
  ConvLayout layout;
  const int32_t* ptr = nullptr;
  const int32_t* inner = nullptr;
  const int32_t* perm = nullptr;
  int64_t segments = 0, entries = 0;
};

template <class Backend>
struct SparseKernels {
  template <class T>
  static void product(const Product<T>& p);
  template <class T>
  static void dot(const Dot<T>& p);
  template <class T>
  static bool pack(const Pack<T>& p);
  template <class T>
  static void gather(const Kept<T>& p);
  template <class T>
  static void scatter(const Kept<T>& p);
  // The index checks (sparse_index.h), on data of the backend's device: whether ptr
  // [segments + 1] starts at 0, never decreases and ends at `entries`; whether every one of the
  // `segments` segments of such a ptr holds strictly increasing inner indices in [0, limit);
  // whether all n indices lie in [0, limit).
  static bool pointers_valid(const int32_t* ptr, int64_t segments, int64_t entries);
  static bool sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner, int64_t entries,
                              int64_t limit);
  static bool in_range(const int32_t* index, int64_t n, int64_t limit);
  // A convolution's entry lists. forward_offsets: off[e], where CSR entry e reads its input
  // planes. The transposed product's channels are the input's phases (c, a, b), c slowest,
  // each holding the kept weights of its phases and writing the phase's region
  // (ConvLayout::transposed_offset): transposed_counts stores channel ch's count at
  // counts[ch]; given their running sums (start [channels + 1]), transposed_entries stores each
  // channel's weights (values: in the CSR's order) and gradient-plane offsets from start[ch]
  // on, in the CSC's order.
  static void forward_offsets(const ConvIndex& index, int64_t* off);
  static void transposed_counts(const ConvIndex& index, int32_t* counts);
  template <class T>
  static void transposed_entries(const ConvIndex& index, const T* values, const int32_t* start, T* w,
                                 int64_t* off);
  // The input (gradient) from a strided transposed product's phase regions (Unphase above).
  template <class T>
  static void unphase(const Unphase<T>& p);
};

// The CPU's SIMD kernels, explicit specialisations defined in sparse_cpu.cpp for float and
// double; the other kernels are the generic ones on the CPU too.
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
template <class T>
void SparseKernels<CpuBackend>::unphase(const Unphase<T>& p);
template <>
template <class T>
void SparseKernels<CpuBackend>::gather(const Kept<T>& p);
template <>
template <class T>
void SparseKernels<CpuBackend>::scatter(const Kept<T>& p);
template <>
bool SparseKernels<CpuBackend>::sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner,
                                                 int64_t entries, int64_t limit);
template <>
bool SparseKernels<CpuBackend>::in_range(const int32_t* index, int64_t n, int64_t limit);

// The explicit instantiations, for one dtype T, of the member templates every backend's
// translation unit (sparse_cpu.cpp, sparse_cuda.cu) defines or takes from sparse_generic.h.
#define ROBPRUNE_SPARSE_KERNELS_FOR(Backend, T)                                                   \
  template void SparseKernels<Backend>::product<T>(const Product<T>&);                            \
  template void SparseKernels<Backend>::dot<T>(const Dot<T>&);                                    \
  template bool SparseKernels<Backend>::pack<T>(const Pack<T>&);                                  \
  template void SparseKernels<Backend>::unphase<T>(const Unphase<T>&);                            \
  template void SparseKernels<Backend>::gather<T>(const Kept<T>&);                                \
  template void SparseKernels<Backend>::scatter<T>(const Kept<T>&);                               \
  template void SparseKernels<Backend>::transposed_entries<T>(const ConvIndex&, const T*, const int32_t*, T*, \
                                                              int64_t*);

// Runs f(SparseKernels<Backend>{}) with the kernels of t's device, that device current (the
// CUDA kernels run on the current device's stream, which must be the data's).
template <class F>
decltype(auto) with_kernels(const at::Tensor& t, F&& f) {
  const c10::OptionalDeviceGuard guard(at::device_of(t));
  return with_backend(t, [&](auto tag) -> decltype(auto) { return f(SparseKernels<typename decltype(tag)::type>{}); });
}

}  // namespace robprune
