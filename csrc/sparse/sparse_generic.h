// The compressed path's kernels (sparse_kernels.h) written once for every backend: C10_HOST_DEVICE
// functors over a Backend's loops (for_each_cpu.h, for_each_cuda.cuh). Included only by the
// translation units that instantiate them with those loops: sparse_cuda.cu for CUDA, and
// sparse_cpu.cpp for the CPU, where they run under ROBPRUNE_SIMD=generic (the CUDA kernels'
// logic, tested on a machine without a GPU) and serve the passes that have no SIMD twin.
//
// A product runs one thread per output element, which walks its channel's entries. Elements are
// numbered with the column fastest, so the threads of a GPU warp share a channel (the same
// entries, the same trip count) and read consecutive input elements of each entry. A Dot is a
// sum per entry over its region, Backend::rows_sum with a row per entry (on a GPU, a block per
// entry reducing in shared memory), the entries' order turned into the values' by a scatter
// afterwards. Every kernel reads exactly its region: the CPU kernels' overread has no use here.
#pragma once

#include "../interval/interval_math.h"
#include "sparse_kernels.h"

#include <robprune/backend.h>
#include <robprune/elementwise.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace robprune {

// One element pair through a Pack's op; returns true for an invalid radius. The formulas are the
// interval family's (interval_math.h), applied to one element; both inputs are read before
// anything is written, so y may be x (the op applied in place). x1 and y1 may be null (a
// copy of one operand).
template <class T, PackOp OP>
C10_HOST_DEVICE inline bool pack_pair(const T* x0, const T* x1, T* y0, T* y1) {
  const T a = *x0, b = x1 ? *x1 : T(0);
  if constexpr (OP == PackOp::kReluBox) return interval::Prologue<T, true>{&a, &b, y0, y1}(0);
  if constexpr (OP == PackOp::kBoundsGrad) {
    interval::ToBoundsBackward<T>{&a, &b, y0, y1}(0);
    return false;
  }
  *y0 = a;
  if (y1) *y1 = b;
  return OP == PackOp::kCheckBox && !(b >= T(0));
}

// Element i of an Unphase's output (sparse_kernels.h) from the pair (z, z1) it holds: a copy,
// or with RELU the pair's gradient through the box's ReLU.
template <class T, bool RELU>
C10_HOST_DEVICE inline void unphase_pair(const Unphase<T>& p, const T* z, const T* z1, int64_t i) {
  if constexpr (RELU) {
    interval::PrologueBackward<T>{z, z1, p.center + i, p.radius + i, p.out + i, p.out1 + i}(0);
  } else {
    p.out[i] = *z;
    if (p.out1) p.out1[i] = *z1;
  }
}

namespace sparse_generic {

// The segment s of a pointer array (ptr[0] = 0, never decreasing, checked) that holds entry e:
// ptr[s] <= e < ptr[s + 1].
C10_HOST_DEVICE inline int64_t segment_of(const int32_t* ptr, int64_t segments, int64_t e) {
  int64_t lo = 0, hi = segments;  // ptr[lo] <= e, and hi is past the answer
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ptr[mid] <= e) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Where entry e of a Product or Dot reads its input (sparse_kernels.h).
template <bool INDEXED, class P>
C10_HOST_DEVICE inline int64_t entry_offset(const P& p, int64_t e) {
  return INDEXED ? int64_t(p.index[e]) * p.index_stride : p.off[e];
}

template <class T>
C10_HOST_DEVICE inline T magnitude(T x) {
  return x < T(0) ? -x : x;  // std::abs is not a device function for every T
}

// Output element i = ((n * channels + o) * rows + r) * cols + c of a Product: the bias plus the
// channel's entries (and the radius product with INTERVAL). INDEXED: one-row planes, offsets
// from index, stored transposed (sparse_kernels.h).
template <class T, bool INDEXED, bool INTERVAL>
struct ProductElement {
  Product<T> p;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t c = i % p.cols, rest = i / p.cols, r = rest % p.rows, o = rest / p.rows % p.channels;
    const int64_t n = rest / p.rows / p.channels;
    const int64_t at = n * p.in_image + r * p.in_row + c * p.col_stride;
    T a = p.bias ? p.bias[o] : T(0), z = T(0);
    for (int32_t e = p.start[o], end = p.start[o + 1]; e < end; ++e) {
      const int64_t k = at + entry_offset<INDEXED>(p, e);
      const T w = p.w[p.perm ? p.perm[e] : e];
      a += w * p.in[k];
      if constexpr (INTERVAL) z += magnitude(w) * p.in1[k];
    }
    if (INTERVAL && p.out_bounds) {
      const T lower = a - z;
      z = a + z;
      a = lower;
    }
    const int64_t to = INDEXED ? c * p.out_row + o : n * p.out_image + o * p.out_channel + r * p.out_row + c;
    p.out[to] = a;
    if constexpr (INTERVAL) p.out1[to] = z;
  }
};

// Row functor (Backend::rows_sum) of a Dot: row e is entry e's sum over the images and its
// region, element j = (n * rows + r) * cols + c.
template <class T, bool INDEXED, bool INTERVAL>
struct DotEntry {
  Dot<T> p;

  struct Row {
    const T* g;
    const T* g1;
    const T* x;
    const T* x1;
    T sign_w;  // the radius product's weight is |w|: its gradient takes sign(w)
    int64_t rows, cols, g_image, g_row, in_image, in_row;
    C10_HOST_DEVICE T operator()(int64_t j) const {
      const int64_t c = j % cols, rest = j / cols, r = rest % rows, n = rest / rows;
      const int64_t gi = n * g_image + r * g_row + c, xi = n * in_image + r * in_row + c;
      T s = g[gi] * x[xi];
      if constexpr (INTERVAL) s += sign_w * (g1[gi] * x1[xi]);
      return s;
    }
  };

  C10_HOST_DEVICE Row row(int64_t e) const {
    const int64_t g_at = segment_of(p.start, p.channels, e) * p.g_channel, x_at = entry_offset<INDEXED>(p, e);
    return {p.g + g_at,
            INTERVAL ? p.g1 + g_at : nullptr,
            p.in + x_at,
            INTERVAL ? p.in1 + x_at : nullptr,
            INTERVAL ? sign(p.w[p.perm ? p.perm[e] : e]) : T(0),
            p.rows,
            p.cols,
            p.g_image,
            p.g_row,
            p.in_image,
            p.in_row};
  }
};

// Row functor (Backend::rows_sum) of a Dot's db: row o is g's channel o summed over the
// images and the region, element j = (n * rows + r) * cols + c.
template <class T>
struct ChannelSum {
  Dot<T> p;

  struct Row {
    const T* g;
    int64_t rows, cols, g_image, g_row;
    C10_HOST_DEVICE T operator()(int64_t j) const {
      const int64_t c = j % cols, rest = j / cols;
      return g[rest / rows * g_image + rest % rows * g_row + c];
    }
  };

  C10_HOST_DEVICE Row row(int64_t o) const { return {p.g + o * p.g_channel, p.rows, p.cols, p.g_image, p.g_row}; }
};

// to[perm[e]] = from[e].
template <class T>
struct Scatter {
  const T* from;
  const int32_t* perm;
  T* to;
  C10_HOST_DEVICE void operator()(int64_t e) const { to[perm[e]] = from[e]; }
};

// Element i of a Pack's output planes, (n, c, a, b, r, q) with q fastest (sparse_kernels.h):
// the input element it holds through the op, or 0 outside the image.
template <class T, PackOp OP>
struct PackElement {
  Pack<T> p;
  C10_HOST_DEVICE bool operator()(int64_t i) const {
    const int64_t q = i % p.out_cols, rest = i / p.out_cols, r = rest % p.out_rows, plane = rest / p.out_rows;
    const int64_t phases = p.stride_h * p.stride_w, phase = plane % phases, c = plane / phases % p.channels;
    const int64_t n = plane / phases / p.channels;
    const int64_t y = r * p.stride_h + phase / p.stride_w - p.top, x = q * p.stride_w + phase % p.stride_w - p.left;
    if (y < 0 || y >= p.height || x < 0 || x >= p.width) {
      p.out[i] = T(0);
      if (p.out1) p.out1[i] = T(0);
      return false;
    }
    const int64_t at = n * p.x_image + c * p.x_channel + y * p.x_row + x * p.x_col;
    return pack_pair<T, OP>(p.x + at, p.x1 ? p.x1 + at : nullptr, p.out + i, p.out1 ? p.out1 + i : nullptr);
  }
};

// Element i = ((n * channels + c) * height + y) * width + x of an Unphase's output.
template <class T, bool RELU>
struct UnphaseElement {
  Unphase<T> p;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t x = i % p.width, rest = i / p.width, y = rest % p.height, image_channel = rest / p.height;
    const int64_t a = (y % p.stride_h + p.pad_h) % p.stride_h, b = (x % p.stride_w + p.pad_w) % p.stride_w;
    const int64_t k = ((image_channel * p.stride_h + a) * p.stride_w + b) * p.rows * p.cols +
                      y / p.stride_h * p.cols + x / p.stride_w;
    unphase_pair<T, RELU>(p, p.z + k, p.z1 ? p.z1 + k : nullptr, i);
  }
};

// Element i of ptr [segments + 1]: true where it breaks "starts at 0, never decreases, ends at
// entries".
struct BadPointer {
  const int32_t* ptr;
  int64_t segments, entries;
  C10_HOST_DEVICE bool operator()(int64_t i) const {
    const bool bad = (i == 0 && ptr[0] != 0) || (i == segments && ptr[i] != entries);
    return bad || (i < segments && ptr[i] > ptr[i + 1]);
  }
};

// Entry e of a checked ptr's segments: true where it lies outside [0, limit) or is not below the
// next entry of its segment.
struct BadEntry {
  const int32_t* ptr;
  int64_t segments;
  const int32_t* inner;
  int64_t limit;
  C10_HOST_DEVICE bool operator()(int64_t e) const {
    const int32_t v = inner[e];
    if (v < 0 || v >= limit) return true;
    return e + 1 < ptr[segment_of(ptr, segments, e) + 1] && inner[e + 1] <= v;
  }
};

struct OutOfRange {
  const int32_t* index;
  int64_t limit;
  C10_HOST_DEVICE bool operator()(int64_t i) const { return index[i] < 0 || index[i] >= limit; }
};

// CSR entry e of a Kept: its value read from W2 (gather), or written to it (TO_DENSE, scatter).
template <class T, bool TO_DENSE>
struct KeptEntry {
  Kept<T> p;
  C10_HOST_DEVICE void operator()(int64_t e) const {
    T& at = p.dense[segment_of(p.row_ptr, p.rows, e) * p.cols + p.col[e]];
    if constexpr (TO_DENSE) at = p.values[e];
    else p.values[e] = at;
  }
};

template <class T>
struct Zero {
  T* out;
  C10_HOST_DEVICE void operator()(int64_t i) const { out[i] = T(0); }
};

// off[e] of CSR entry e: where its kept weight (row o, column col[e]) reads the input planes.
struct ForwardOffset {
  ConvIndex index;
  int64_t* off;
  C10_HOST_DEVICE void operator()(int64_t e) const {
    off[e] = index.layout.forward_offset(segment_of(index.ptr, index.segments, e), index.inner[e]);
  }
};

// Calls f(CSC entry e, output channel o, tap i, tap j) for every entry of transposed channel ch
// = (c, a, b), in order: the kept weights (o, c, i, j) of the taps of phases (a, b), o in c's
// group. W2's column (c % in_per_group, i, j) holds the weights of every group, so only the
// rows of c's group are taken.
template <class F>
C10_HOST_DEVICE inline void each_transposed_entry(const ConvIndex& index, int64_t ch, const F& f) {
  const ConvLayout& l = index.layout;
  const int64_t phases = l.phases(), c = ch / phases, a = ch % phases / l.w.stride, b = ch % l.w.stride;
  const int64_t first = c / l.in_per_group() * l.out_per_group(), last = first + l.out_per_group();
  for (int64_t i = 0; i < l.h.kernel; ++i) {
    if (l.h.phase(i) != a) continue;
    for (int64_t j = 0; j < l.w.kernel; ++j) {
      if (l.w.phase(j) != b) continue;
      const int64_t column = (c % l.in_per_group() * l.h.kernel + i) * l.w.kernel + j;
      for (int32_t e = index.ptr[column], end = index.ptr[column + 1]; e < end; ++e) {
        const int64_t o = index.inner[e];
        if (o >= first && o < last) f(e, o, i, j);
      }
    }
  }
}

struct TransposedCount {
  ConvIndex index;
  int32_t* counts;
  C10_HOST_DEVICE void operator()(int64_t ch) const {
    int32_t count = 0;
    each_transposed_entry(index, ch, [&](int32_t, int64_t, int64_t, int64_t) { ++count; });
    counts[ch] = count;
  }
};

template <class T>
struct TransposedFill {
  ConvIndex index;
  const T* values;
  const int32_t* start;
  T* w;
  int64_t* off;
  C10_HOST_DEVICE void operator()(int64_t ch) const {
    int64_t at = start[ch];
    each_transposed_entry(index, ch, [&](int32_t e, int64_t o, int64_t i, int64_t j) {
      w[at] = values[index.perm[e]];
      off[at] = index.layout.transposed_offset(o, i, j);
      ++at;
    });
  }
};

// f(std::true_type) or f(std::false_type): a runtime flag as a template argument.
template <class F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace sparse_generic

// The device type of a backend's data.
template <class Backend>
struct DeviceOf;
template <>
struct DeviceOf<CpuBackend> {
  static constexpr c10::DeviceType value = c10::DeviceType::CPU;
};
template <>
struct DeviceOf<CudaBackend> {
  static constexpr c10::DeviceType value = c10::DeviceType::CUDA;
};

template <class Backend>
struct GenericSparseKernels {
  // Options of T's buffers on the backend's (current) device.
  template <class T>
  static at::TensorOptions options() {
    return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value).device(DeviceOf<Backend>::value);
  }

  // for_each_any's `like`: where its verdict is gathered.
  template <class F>
  static bool any(int64_t n, const F& f) {
    return Backend::for_each_any(n, f, at::empty({0}, options<int32_t>()));
  }

  template <class T>
  static void product(const Product<T>& p) {
    using namespace sparse_generic;
    with_flag(p.indexed, [&](auto indexed) {
      with_flag(p.interval, [&](auto interval) {
        Backend::for_each(p.images * p.channels * p.rows * p.cols,
                          ProductElement<T, decltype(indexed)::value, decltype(interval)::value>{p});
      });
    });
    if (!p.dw) return;
    // The weights' gradient that rides along (sparse_kernels.h): a Dot of the channels' own rows
    // (self, self1) with the entries' input rows, in a pass of its own (one-row planes).
    Dot<T> d;
    static_cast<EntryLists<T>&>(d) = p;
    d.w = p.w;
    d.g = p.self;
    d.g1 = p.self1;
    d.g_channel = p.self_row;
    dot(d);
  }

  template <class T>
  static void dot(const Dot<T>& p) {
    using namespace sparse_generic;
    // rows_sum stores entry e's sum at its row, e: through a buffer where perm reorders them.
    const at::Tensor sums = p.perm ? at::empty({p.entries}, options<T>()) : at::Tensor();
    T* to = p.perm ? sums.mutable_data_ptr<T>() : p.dw;
    with_flag(p.indexed, [&](auto indexed) {
      with_flag(p.interval, [&](auto interval) {
        Backend::rows_sum(p.entries, p.images * p.rows * p.cols,
                          DotEntry<T, decltype(indexed)::value, decltype(interval)::value>{p}, to);
      });
    });
    if (p.perm) Backend::for_each(p.entries, Scatter<T>{to, p.perm, p.dw});
    if (p.db) Backend::rows_sum(p.channels, p.images * p.rows * p.cols, ChannelSum<T>{p}, p.db);
  }

  template <class T>
  static bool pack(const Pack<T>& p) {
    using namespace sparse_generic;
    const int64_t n = p.images * p.channels * p.stride_h * p.stride_w * p.out_rows * p.out_cols;
    switch (p.op) {
      case PackOp::kReluBox: return any(n, PackElement<T, PackOp::kReluBox>{p});
      case PackOp::kCheckBox: return any(n, PackElement<T, PackOp::kCheckBox>{p});
      case PackOp::kBoundsGrad: Backend::for_each(n, PackElement<T, PackOp::kBoundsGrad>{p}); return false;
      default: Backend::for_each(n, PackElement<T, PackOp::kCopy>{p}); return false;
    }
  }

  template <class T>
  static void unphase(const Unphase<T>& p) {
    using namespace sparse_generic;
    with_flag(p.center != nullptr, [&](auto relu) {
      Backend::for_each(p.images * p.channels * p.height * p.width, UnphaseElement<T, decltype(relu)::value>{p});
    });
  }

  template <class T>
  static void gather(const Kept<T>& p) {
    Backend::for_each(p.entries, sparse_generic::KeptEntry<T, false>{p});
  }

  // Zeros first, then the entries (kernels run in order on the backend's stream).
  template <class T>
  static void scatter(const Kept<T>& p) {
    Backend::for_each(p.rows * p.cols, sparse_generic::Zero<T>{p.dense});
    Backend::for_each(p.entries, sparse_generic::KeptEntry<T, true>{p});
  }

  static bool pointers_valid(const int32_t* ptr, int64_t segments, int64_t entries) {
    return !any(segments + 1, sparse_generic::BadPointer{ptr, segments, entries});
  }

  static bool sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner, int64_t entries,
                              int64_t limit) {
    return !any(entries, sparse_generic::BadEntry{ptr, segments, inner, limit});
  }

  static bool in_range(const int32_t* index, int64_t n, int64_t limit) {
    return !any(n, sparse_generic::OutOfRange{index, limit});
  }

  static void forward_offsets(const ConvIndex& index, int64_t* off) {
    Backend::for_each(index.entries, sparse_generic::ForwardOffset{index, off});
  }

  static void transposed_counts(const ConvIndex& index, int32_t* counts) {
    Backend::for_each(index.layout.in_channels * index.layout.phases(), sparse_generic::TransposedCount{index, counts});
  }

  template <class T>
  static void transposed_entries(const ConvIndex& index, const T* values, const int32_t* start, T* w,
                                 int64_t* off) {
    Backend::for_each(index.layout.in_channels * index.layout.phases(),
                      sparse_generic::TransposedFill<T>{index, values, start, w, off});
  }
};

// Any backend without kernels of its own runs these (the CPU specialises the SIMD ones, see
// sparse_kernels.h).
template <class Backend>
template <class T>
void SparseKernels<Backend>::product(const Product<T>& p) {
  GenericSparseKernels<Backend>::product(p);
}

template <class Backend>
template <class T>
void SparseKernels<Backend>::dot(const Dot<T>& p) {
  GenericSparseKernels<Backend>::dot(p);
}

template <class Backend>
template <class T>
bool SparseKernels<Backend>::pack(const Pack<T>& p) {
  return GenericSparseKernels<Backend>::pack(p);
}

template <class Backend>
template <class T>
void SparseKernels<Backend>::unphase(const Unphase<T>& p) {
  GenericSparseKernels<Backend>::unphase(p);
}

template <class Backend>
template <class T>
void SparseKernels<Backend>::gather(const Kept<T>& p) {
  GenericSparseKernels<Backend>::gather(p);
}

template <class Backend>
template <class T>
void SparseKernels<Backend>::scatter(const Kept<T>& p) {
  GenericSparseKernels<Backend>::scatter(p);
}

template <class Backend>
bool SparseKernels<Backend>::pointers_valid(const int32_t* ptr, int64_t segments, int64_t entries) {
  return GenericSparseKernels<Backend>::pointers_valid(ptr, segments, entries);
}

template <class Backend>
bool SparseKernels<Backend>::sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner,
                                             int64_t entries, int64_t limit) {
  return GenericSparseKernels<Backend>::sorted_segments(ptr, segments, inner, entries, limit);
}

template <class Backend>
bool SparseKernels<Backend>::in_range(const int32_t* index, int64_t n, int64_t limit) {
  return GenericSparseKernels<Backend>::in_range(index, n, limit);
}

template <class Backend>
void SparseKernels<Backend>::forward_offsets(const ConvIndex& index, int64_t* off) {
  GenericSparseKernels<Backend>::forward_offsets(index, off);
}

template <class Backend>
void SparseKernels<Backend>::transposed_counts(const ConvIndex& index, int32_t* counts) {
  GenericSparseKernels<Backend>::transposed_counts(index, counts);
}

template <class Backend>
template <class T>
void SparseKernels<Backend>::transposed_entries(const ConvIndex& index, const T* values, const int32_t* start,
                                                T* w, int64_t* off) {
  GenericSparseKernels<Backend>::transposed_entries(index, values, start, w, off);
}

}  // namespace robprune
