// The compressed path's CPU kernels (sparse_kernels.h): SIMD over the contiguous rows of the
// planes, one parallel region per kernel (on a busy machine each region may wait a scheduler
// quantum for its second thread, so passes are not split into many).
//
// A Product computes a tile of RR rows x VC vectors of one output plane in registers: for every
// entry of the channel it broadcasts the weight and adds weight * (the input tile at the
// entry's offset), one load and one FMA per vector. The tile stays in registers across all the
// entries (the output is written once), and the entries walk the input in column order, so a
// channel's reads stay close together. A convolution's tile is RR rows of its output image,
// its tasks ordered so that the channels of a row block share their input rows in L1. A linear
// layer's tile is a chunk of one row of its batch (the input's chunk kept in L2), its output
// stored transposed through registers; each kept weight then costs one input row read from L2
// per chunk, which bounds it (about 0.6 ns per 16 floats on the 2-core Xeon it was tuned on).
//
// Portable builds (-O3, no -march) still get the machine's vectors: the loops are written once
// with GCC vector types of the ISA's width and compiled three times, for AVX-512, AVX2 + FMA and
// the x86-64 baseline (SSE2), through the target attribute; the first call picks the best the
// CPU has (ROBPRUNE_SIMD=avx512|avx2|baseline overrides, for tests and comparisons, and
// ROBPRUNE_SIMD=generic runs the generic kernels of sparse_generic.h instead, the CUDA ones'
// logic). The kernels without a SIMD twin (the entry lists, the pointer check) are the generic
// ones, instantiated here for the CPU.
#include "sparse_kernels.h"

#include "sparse_generic.h"

#include <robprune/for_each_cpu.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Vector types wider than the baseline's appear in always-inline helpers whose only callers
// enable the matching ISA; GCC warns that their ABI would change, which never happens here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace robprune {
namespace {

#define ROBPRUNE_INLINE inline __attribute__((always_inline))

template <class T, int BYTES>
struct VecOf {
  // aligned(sizeof(T)): loads and stores at any element address; may_alias: read through
  // pointers to T.
  typedef T type __attribute__((vector_size(BYTES), aligned(sizeof(T)), may_alias));
};
template <class T, int BYTES>
using Vec = typename VecOf<T, BYTES>::type;

template <int K>
using Int = std::integral_constant<int, K>;

template <class V, class T>
ROBPRUNE_INLINE V load(const T* p) {
  return *reinterpret_cast<const V*>(p);
}

template <class V, class T>
ROBPRUNE_INLINE void store(T* p, V v) {
  *reinterpret_cast<V*>(p) = v;
}

// The first n lanes (0 <= n <= lanes) from p, the others 0: never touches memory past p + n.
template <class V, class T>
ROBPRUNE_INLINE V load_first(const T* p, int n) {
  V v = {};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}

template <class V, class T>
ROBPRUNE_INLINE void store_first(T* p, V v, int n) {
  std::memcpy(p, &v, sizeof(T) * n);
}

template <class V, class T>
ROBPRUNE_INLINE V splat(T x) {
  return V{} + x;
}

// The sum of v's lanes, halving the vector each step: log2(lanes) dependent adds, where a loop
// over the lanes would chain them all (the compiler may not reassociate float sums).
template <class T, int BYTES>
ROBPRUNE_INLINE T lane_sum(Vec<T, BYTES> v) {
  if constexpr (BYTES == sizeof(T)) {
    return v[0];
  } else {
    Vec<T, BYTES / 2> lo, hi;
    std::memcpy(&lo, &v, BYTES / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + BYTES / 2, BYTES / 2);
    return lane_sum<T, BYTES / 2>(lo + hi);
  }
}

// One stage of an L x L transpose held in L vectors: rows i and i + D (i & D == 0) swap their
// off-diagonal D x D blocks; stages D = L/2, ..., 1 transpose the whole block. low: row i's
// result (its lanes j with j & D == 0, then row i + D's such lanes), high: row i + D's.
template <int D, int L, class V, size_t... J>
ROBPRUNE_INLINE V low_half(V a, V b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, ((J & D) == 0 ? int(J) : int(J) - D + L)...);
}

template <int D, int L, class V, size_t... J>
ROBPRUNE_INLINE V high_half(V a, V b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, ((J & D) == 0 ? int(J) + D : int(J) + L)...);
}

// dst[i][j] = src[j][i] for an L x L block (L: the vector's lanes), rows src_row and dst_row
// apart: L loads, log2(L) * L two-source shuffles, L stores.
template <class T, int BYTES>
ROBPRUNE_INLINE void transpose_block(const T* src, int64_t src_row, T* dst, int64_t dst_row) {
  using V = Vec<T, BYTES>;
  constexpr int L = BYTES / sizeof(T);
  V r[L];
  for (int i = 0; i < L; ++i) r[i] = load<V>(src + i * src_row);
  auto stage = [&](auto distance) {
    constexpr int D = decltype(distance)::value;
    for (int i = 0; i < L; ++i)
      if ((i & D) == 0) {
        const V a = r[i], b = r[i + D];
        r[i] = low_half<D, L>(a, b, std::make_index_sequence<L>{});
        r[i + D] = high_half<D, L>(a, b, std::make_index_sequence<L>{});
      }
  };
  if constexpr (L >= 16) stage(Int<8>{});
  if constexpr (L >= 8) stage(Int<4>{});
  if constexpr (L >= 4) stage(Int<2>{});
  if constexpr (L >= 2) stage(Int<1>{});
  for (int i = 0; i < L; ++i) store(dst + i * dst_row, r[i]);
}

// ---- Product ----------------------------------------------------------------------------------

// A Dot entry's weight and gradient slot, and an entry's input offset (sparse_kernels.h: through
// perm and index when given).
template <class P>
ROBPRUNE_INLINE int32_t slot(const P& p, int32_t e) {
  return p.perm ? p.perm[e] : e;
}

template <bool INDEXED, class P>
ROBPRUNE_INLINE int64_t offset(const P& p, int32_t e) {
  return INDEXED ? p.index[e] * p.index_stride : p.off[e];
}

// One tile: rows [r0, r0 + RR) x columns [c0, c0 + VC * lanes) of plane (n, o), over the
// entries [e_begin, e_end), stored to out (and out1) with rows out_row apart. U sets of
// accumulators take turns over the entries, so that a small tile still has enough independent
// FMA chains to hide their latency. EXACT: the input is read only inside the region's columns
// (partial loads at the right edge); without, whole vectors are read and the lanes past the
// region dropped at the store. INDEXED: offsets from index.
template <class T, int BYTES, int RR, int VC, int U, bool INTERVAL, bool EXACT, bool INDEXED>
ROBPRUNE_INLINE void product_tile(const Product<T>& p, int64_t n, int64_t o, int64_t r0, int64_t c0,
                                  int32_t e_begin, int32_t e_end, T* out, T* out1, int64_t out_row) {
  using V = Vec<T, BYTES>;
  constexpr int L = BYTES / sizeof(T);
  int lanes[VC];  // valid lanes of each vector
  for (int v = 0; v < VC; ++v)
    lanes[v] = static_cast<int>(std::clamp<int64_t>(p.cols - c0 - int64_t(v) * L, 0, L));
  const int rows = static_cast<int>(std::min<int64_t>(RR, p.rows - r0));
  V acc[U][RR][VC], acc1[U][RR][VC];
  const V b = p.bias ? splat<V>(p.bias[o]) : V{};
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RR; ++r)
      for (int v = 0; v < VC; ++v) {
        acc[u][r][v] = u == 0 ? b : V{};
        acc1[u][r][v] = V{};
      }
  const int64_t in_row = p.in_row;
  const T* base = p.in + n * p.in_image + r0 * in_row + c0;
  const T* base1 = INTERVAL ? p.in1 + n * p.in_image + r0 * in_row + c0 : nullptr;
  auto add = [&](int u, int32_t e) {
    const T w = p.w[slot(p, e)];
    const int64_t off = offset<INDEXED>(p, e);
    const V wv = splat<V>(w);
    const T* q = base + off;
    for (int r = 0; r < RR; ++r)
      for (int v = 0; v < VC; ++v) {
        const T* at = q + r * in_row + v * L;
        acc[u][r][v] += wv * (EXACT && lanes[v] < L ? load_first<V>(at, lanes[v]) : load<V>(at));
      }
    if constexpr (INTERVAL) {
      const V av = splat<V>(std::abs(w));  // branch-free: a branch on random signs mispredicts half the time
      const T* q1 = base1 + off;
      for (int r = 0; r < RR; ++r)
        for (int v = 0; v < VC; ++v) {
          const T* at = q1 + r * in_row + v * L;
          acc1[u][r][v] += av * (EXACT && lanes[v] < L ? load_first<V>(at, lanes[v]) : load<V>(at));
        }
    }
  };
  int32_t e = e_begin;
  for (; e + U <= e_end; e += U)
    for (int u = 0; u < U; ++u) add(u, e + u);
  for (; e < e_end; ++e) add(0, e);
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < RR; ++r)
      for (int v = 0; v < VC; ++v) {
        acc[0][r][v] += acc[u][r][v];
        acc1[0][r][v] += acc1[u][r][v];
      }
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < VC; ++v) {
      V a = acc[0][r][v], z = acc1[0][r][v];
      if (INTERVAL && p.out_bounds) {
        const V lower = a - z;
        z = a + z;
        a = lower;
      }
      const int64_t at = r * out_row + v * L;
      if (lanes[v] == L) {
        store(out + at, a);
        if (INTERVAL) store(out1 + at, z);
      } else if (lanes[v] > 0) {
        store_first(out + at, a, lanes[v]);
        if (INTERVAL) store_first(out1 + at, z, lanes[v]);
      }
    }
}

// Planes of several rows (a convolution): tasks [begin, end) of (image, row block, channel),
// the channel fastest, so that every channel of a row block reads the same few input rows,
// which stay in L1; every column block of each, every entry.
template <class T, int BYTES, int RR, int VC, int U, bool INTERVAL>
ROBPRUNE_INLINE void plane_tasks(const Product<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t W = int64_t(VC) * (BYTES / sizeof(T));
  const int64_t blocks = (p.rows + RR - 1) / RR;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o = t % p.channels, rb = t / p.channels % blocks, n = t / p.channels / blocks;
    const int32_t e0 = p.start[o], e1 = p.start[o + 1];
    for (int64_t c0 = 0; c0 < p.cols; c0 += W) {
      const int64_t at = n * p.out_image + o * p.out_channel + rb * RR * p.out_row + c0;
      T* out = p.out + at;
      T* out1 = INTERVAL ? p.out1 + at : nullptr;
      if (!p.overread && c0 + W > p.cols)
        product_tile<T, BYTES, RR, VC, U, INTERVAL, true, false>(p, n, o, rb * RR, c0, e0, e1, out, out1, p.out_row);
      else
        product_tile<T, BYTES, RR, VC, U, INTERVAL, false, false>(p, n, o, rb * RR, c0, e0, e1, out, out1, p.out_row);
    }
  }
}

// Stores `count` staged rows of `valid` columns (of W) transposed: dst[j * dst_row + i] =
// staged[i][j], L x L blocks through registers where whole.
template <class T, int BYTES, int64_t W>
ROBPRUNE_INLINE void store_transposed(const T (*staged)[W], int64_t count, int64_t valid, T* dst, int64_t dst_row) {
  constexpr int64_t L = BYTES / sizeof(T);
  int64_t j = 0;
  if (count == L)
    for (; j + L <= valid; j += L) transpose_block<T, BYTES>(staged[0] + j, W, dst + j * dst_row, dst_row);
  for (; j < valid; ++j)
    for (int64_t i = 0; i < count; ++i) dst[j * dst_row + i] = staged[i][j];
}

// One-row planes (a linear layer, its batch along the row): tasks [begin, end) of (column
// chunk, group of L channels), the chunk slowest. Every entry reads its input row's chunk;
// walking all channels over one chunk keeps the input's chunk (input rows x chunk) in L2, where
// the whole batch may not fit (4096 inputs x 128 samples are 2 MiB). A group's tiles (L channels
// x the chunk) are staged in L1, then stored transposed, L x L blocks at a time
// (transpose_block): the result comes out in the layer's (batch, features) layout.
template <class T, int BYTES, int VC, int U, bool INTERVAL>
ROBPRUNE_INLINE void row_tasks(const Product<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t L = BYTES / sizeof(T), W = int64_t(VC) * L;
  alignas(64) T stage[L][W];
  alignas(64) T stage1[INTERVAL ? L : 1][INTERVAL ? W : 1];
  const int64_t groups = (p.channels + L - 1) / L;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t c0 = t / groups * W, o0 = t % groups * L;
    const int64_t count = std::min(L, p.channels - o0), valid = std::min(W, p.cols - c0);
    const bool exact = !p.overread && c0 + W > p.cols;
    for (int64_t i = 0; i < count; ++i) {
      const int32_t e0 = p.start[o0 + i], e1 = p.start[o0 + i + 1];
      T* out1 = INTERVAL ? stage1[i] : nullptr;
      if (exact)
        product_tile<T, BYTES, 1, VC, U, INTERVAL, true, true>(p, 0, o0 + i, 0, c0, e0, e1, stage[i], out1, W);
      else
        product_tile<T, BYTES, 1, VC, U, INTERVAL, false, true>(p, 0, o0 + i, 0, c0, e0, e1, stage[i], out1, W);
    }
    store_transposed<T, BYTES>(stage, count, valid, p.out + c0 * p.out_row + o0, p.out_row);
    if constexpr (INTERVAL) store_transposed<T, BYTES>(stage1, count, valid, p.out1 + c0 * p.out_row + o0, p.out_row);
  }
}

// A one-row tile of the product with dw (sparse_kernels.h): the VC vectors [c0, c0 + VC * L)
// of the channel's own row (and with interval its own row of self1) stay in registers; every
// entry's input vectors, loaded once, feed both the product (acc += w * in, acc1 += |w| * in1)
// and the entry's dot product (own . in + sign(w) own1 . in1), whose P partial sums are reduced
// per entry and added to dw (after the first chunk). EXACT as product_tile.
template <class T, int BYTES, int VC, bool EXACT, bool INTERVAL>
ROBPRUNE_INLINE void product_dot_tile(const Product<T>& p, int64_t o, int64_t c0, T* out, T* out1, bool accumulate) {
  using V = Vec<T, BYTES>;
  constexpr int L = BYTES / sizeof(T), P = VC >= 2 ? 2 : 1, VC1 = INTERVAL ? VC : 1;
  int lanes[VC];
  for (int v = 0; v < VC; ++v)
    lanes[v] = static_cast<int>(std::clamp<int64_t>(p.cols - c0 - int64_t(v) * L, 0, L));
  auto read = [&](const T* at, int v) { return EXACT && lanes[v] < L ? load_first<V>(at, lanes[v]) : load<V>(at); };
  V own[VC], acc[VC], own1[VC1], acc1[VC1];
  const T* self = p.self + o * p.self_row + c0;
  const T* self1 = INTERVAL ? p.self1 + o * p.self_row + c0 : nullptr;
  for (int v = 0; v < VC; ++v) {
    own[v] = read(self + v * L, v);
    acc[v] = V{};
    if constexpr (INTERVAL) {
      own1[v] = read(self1 + v * L, v);
      acc1[v] = V{};
    }
  }
  const T* base = p.in + c0;
  const T* base1 = INTERVAL ? p.in1 + c0 : nullptr;
  // One operand's part of an entry (the radius's with RADIUS): its input vectors at q into the
  // product (weight wv) and into the dot product with the own row, whose sum (a vector) it
  // returns. The arrays are named, not passed: GCC keeps them in registers only so.
  auto entry = [&](auto radius, const T* q, V wv) {
    constexpr bool RADIUS = decltype(radius)::value;
    V dot[P];
    for (int i = 0; i < P; ++i) dot[i] = V{};
    for (int v = 0; v < VC; ++v) {
      const V x = read(q + v * L, v);
      if constexpr (RADIUS) {
        acc1[v] += wv * x;
        dot[v % P] += own1[v] * x;
      } else {
        acc[v] += wv * x;
        dot[v % P] += own[v] * x;
      }
    }
    for (int i = 1; i < P; ++i) dot[0] += dot[i];
    return dot[0];
  };
  const int32_t end = p.start[o + 1];
  for (int32_t e = p.start[o]; e < end; ++e) {
    const int32_t k = p.perm[e];
    const T w = p.w[k];
    const int64_t off = offset<true>(p, e);
    V dot = entry(std::false_type{}, base + off, splat<V>(w));
    // The radius product multiplies by |w|: its dot product counts with w's sign.
    if constexpr (INTERVAL) dot += splat<V>(sign(w)) * entry(std::true_type{}, base1 + off, splat<V>(std::abs(w)));
    const T s = lane_sum<T, BYTES>(dot);
    T& slot_e = p.dw[k];
    slot_e = accumulate ? slot_e + s : s;
  }
  auto put = [&](T* to, const V* from) {
    for (int v = 0; v < VC; ++v) {
      if (lanes[v] == L) store(to + v * L, from[v]);
      else if (lanes[v] > 0) store_first(to + v * L, from[v], lanes[v]);
    }
  };
  put(out, acc);
  if constexpr (INTERVAL) put(out1, acc1);
}

// row_tasks with dw: tasks [begin, end) of groups of L channels, each walking every chunk of the
// batch itself (a channel's dot products add up over the chunks, in one task).
template <class T, int BYTES, int VC, bool INTERVAL>
ROBPRUNE_INLINE void row_dot_tasks(const Product<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t L = BYTES / sizeof(T), W = int64_t(VC) * L;
  alignas(64) T stage[L][W];
  alignas(64) T stage1[INTERVAL ? L : 1][INTERVAL ? W : 1];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o0 = t * L, count = std::min(L, p.channels - o0);
    for (int64_t c0 = 0; c0 < std::max<int64_t>(p.cols, 1); c0 += W) {
      const int64_t valid = std::min(W, p.cols - c0);
      for (int64_t i = 0; i < count; ++i) {
        T* out1 = INTERVAL ? stage1[i] : nullptr;
        // Exact at the right edge even with overread: lanes past the batch would add to the dots.
        if (c0 + W > p.cols)
          product_dot_tile<T, BYTES, VC, true, INTERVAL>(p, o0 + i, c0, stage[i], out1, c0 > 0);
        else
          product_dot_tile<T, BYTES, VC, false, INTERVAL>(p, o0 + i, c0, stage[i], out1, c0 > 0);
      }
      store_transposed<T, BYTES>(stage, count, valid, p.out + c0 * p.out_row + o0, p.out_row);
      if constexpr (INTERVAL)
        store_transposed<T, BYTES>(stage1, count, valid, p.out1 + c0 * p.out_row + o0, p.out_row);
    }
  }
}

// ---- Dot ----------------------------------------------------------------------------------------

// Images [n0, n1)'s part of the dot products of the E entries [e0, e0 + E) of channel o with one
// operand pair: the centre's (g, in), or with RADIUS the radius's (g1, in1), whose sums count
// with the sign of the entry's weight (the radius product multiplies by |w|). Stored to dw, or
// added to it (accumulate). The E products share each load of g. Rows take turns over two
// sets of accumulators (2E independent FMA chains); a row takes whole vectors, then with TAIL
// a partial one. GCC keeps the accumulators in registers only when every index into them is a
// constant before its scalar replacement (which runs before it unrolls loops: so the two rows
// of a step are two calls, not a loop over a row index modulo 2) and no partial load, which
// goes through memcpy, reaches them (so rows that are whole vectors, most planes, take TAIL
// false); otherwise they are stored and loaded around every row.
template <class T, int BYTES, int E, bool TAIL, bool RADIUS>
ROBPRUNE_INLINE void dot_group(const Dot<T>& p, int64_t o, int32_t e0, int64_t n0, int64_t n1, bool accumulate) {
  using V = Vec<T, BYTES>;
  constexpr int L = BYTES / sizeof(T), P = 2;
  V acc[E][P];
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < P; ++k) acc[e][k] = V{};
  const T* g = (RADIUS ? p.g1 : p.g) + n0 * p.g_image + o * p.g_channel;
  const T* x = (RADIUS ? p.in1 : p.in) + n0 * p.in_image;
  // Every entry's input plane, read at the same offset (row and column) for all: E base
  // registers and one index, where E pointers per row would not fit the registers.
  const T* xe[E];
  for (int e = 0; e < E; ++e) xe[e] = x + (p.indexed ? offset<true>(p, e0 + e) : p.off[e0 + e]);
  const int64_t whole = p.cols / L * L;
  const int tail = static_cast<int>(p.cols - whole);
  auto row = [&](int64_t r, int k) {
    const T* g_row = g + r * p.g_row;
    const int64_t x_row = r * p.in_row;
    auto add = [&](int64_t c, auto read) {
      const V gv = read(g_row + c);
      for (int e = 0; e < E; ++e) acc[e][k] += gv * read(xe[e] + x_row + c);
    };
    for (int64_t c = 0; c < whole; c += L) add(c, [](const T* at) { return load<V>(at); });
    if (TAIL && tail) add(whole, [&](const T* at) { return load_first<V>(at, tail); });
  };
  for (int64_t n = n0; n < n1; ++n) {
    int64_t r = 0;
    for (; r + P <= p.rows; r += P) {
      row(r, 0);
      row(r + 1, 1);
    }
    for (; r < p.rows; ++r) row(r, 0);
    g += p.g_image;
    for (int e = 0; e < E; ++e) xe[e] += p.in_image;
  }
  for (int e = 0; e < E; ++e) {
    for (int k = 1; k < P; ++k) acc[e][0] += acc[e][k];
    T s = lane_sum<T, BYTES>(acc[e][0]);
    const int32_t k = slot(p, e0 + e);
    if constexpr (RADIUS) s *= sign(p.w[k]);
    p.dw[k] = accumulate ? p.dw[k] + s : s;
  }
}

// Images [n0, n1)'s part of db[o] (sparse_kernels.h): channel o of g summed over them, just
// after the centre's products read it (from cache), two chains of whole vectors, then with TAIL
// a partial one per row.
template <class T, int BYTES, bool TAIL>
ROBPRUNE_INLINE void channel_sum(const Dot<T>& p, int64_t o, int64_t n0, int64_t n1) {
  using V = Vec<T, BYTES>;
  constexpr int L = BYTES / sizeof(T);
  const int64_t whole = p.cols / L * L;
  const int tail = static_cast<int>(p.cols - whole);
  V a0{}, a1{};
  auto row = [&](const T* g, V& acc) {
    for (int64_t c = 0; c < whole; c += L) acc += load<V>(g + c);
    if (TAIL && tail) acc += load_first<V>(g + whole, tail);
  };
  for (int64_t n = n0; n < n1; ++n) {
    const T* g = p.g + n * p.g_image + o * p.g_channel;
    int64_t r = 0;
    for (; r + 2 <= p.rows; r += 2) {
      row(g + r * p.g_row, a0);
      row(g + (r + 1) * p.g_row, a1);
    }
    if (r < p.rows) row(g + r * p.g_row, a0);
  }
  const T s = lane_sum<T, BYTES>(a0 + a1);
  p.db[o] = n0 > 0 ? p.db[o] + s : s;
}

// Images [n0, n1)'s part of the dot products of channel o's entries [e, stop) with one operand pair
// (dot_group): groups of E, the rest in groups half as large, and so on (a single entry would
// load g for itself alone, with 2 chains).
template <class T, int BYTES, int E, bool TAIL, bool RADIUS>
ROBPRUNE_INLINE void dot_channel(const Dot<T>& p, int64_t o, int32_t e, int32_t stop, int64_t n0, int64_t n1,
                                 bool accumulate) {
  for (; e + E <= stop; e += E) dot_group<T, BYTES, E, TAIL, RADIUS>(p, o, e, n0, n1, accumulate);
  if constexpr (E > 1) dot_channel<T, BYTES, E / 2, TAIL, RADIUS>(p, o, e, stop, n0, n1, accumulate);
}

// Images a dot product's accumulators run over before their lanes are summed (dot_group): the
// sums of the lanes and the stores to dw cost as much as a small plane's loads and FMAs (conv4's
// 8x8 output: 8 rows of 8 entries against 8 sums and stores), so they are paid once per 8 images
// (conv4's weight gradient 17.8 -> 14.4 ms; 16 images gained no more).
constexpr int64_t kDotImages = 8;

// Channels [begin, end), kDotImages images at a time. With interval, the centre's products of
// all the channels, then the radius's: each pass reads one operand's planes of the images.
template <class T, int BYTES, int REGS, bool TAIL, bool INTERVAL>
ROBPRUNE_INLINE void dot_images(const Dot<T>& p, int64_t begin, int64_t end) {
  constexpr int E = REGS >= 16 ? 8 : 4;  // 2E accumulators, within REGS
  for (int64_t n0 = 0; n0 < p.images; n0 += kDotImages) {
    const int64_t n1 = std::min(p.images, n0 + kDotImages);
    for (int64_t o = begin; o < end; ++o) {
      dot_channel<T, BYTES, E, TAIL, false>(p, o, p.start[o], p.start[o + 1], n0, n1, n0 > 0);
      if (p.db) channel_sum<T, BYTES, TAIL>(p, o, n0, n1);
    }
    if constexpr (INTERVAL)
      for (int64_t o = begin; o < end; ++o)
        dot_channel<T, BYTES, E, TAIL, true>(p, o, p.start[o], p.start[o + 1], n0, n1, true);
  }
}

// dot_images over channels [begin, end). Planes at most half a vector wide take the narrowest
// vectors that hold a row (a 4x4 stride-2 convolution's 8x8 output: a row is 8 floats, and a
// 16-lane vector would be half empty, through partial loads).
template <class T, int BYTES, int REGS, bool INTERVAL>
ROBPRUNE_INLINE void dot_channels(const Dot<T>& p, int64_t begin, int64_t end) {
  if constexpr (BYTES > 16) {
    if (p.cols * int64_t(sizeof(T)) * 2 <= BYTES) return dot_channels<T, BYTES / 2, REGS, INTERVAL>(p, begin, end);
  }
  if (p.cols % int64_t(BYTES / sizeof(T)) == 0) return dot_images<T, BYTES, REGS, false, INTERVAL>(p, begin, end);
  dot_images<T, BYTES, REGS, true, INTERVAL>(p, begin, end);
}

// ---- Pack ---------------------------------------------------------------------------------------

// The lanes FIRST, FIRST + 2, ... of two consecutive vectors: one two-source shuffle.
template <int FIRST, class V, size_t... I>
ROBPRUNE_INLINE V every_other(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, int(2 * I + FIRST)...);
}

// Elements 0, 2, 4, ... of a staged row of m elements to out0 and 1, 3, 5, ... to out1 (a
// stride-2 row's two phases): two loads and two two-source shuffles per 2L elements. What is
// left after the whole vectors takes vectors half as wide (a row of 16 floats: two 8-lane
// stores, not partial 16-lane ones, which go through memcpy), then partial ones. The staging
// row may be read past m (it has room); the outputs are written exactly.
template <class T, int BYTES>
ROBPRUNE_INLINE void deinterleave(const T* staged, int64_t m, T* out0, T* out1) {
  using V = Vec<T, BYTES>;
  constexpr int64_t L = BYTES / sizeof(T);
  auto split = [&](int64_t j, auto store_even, auto store_odd) {
    const V lo = load<V>(staged + j), hi = load<V>(staged + j + L);
    store_even(out0 + j / 2, every_other<0>(lo, hi, std::make_index_sequence<L>{}));
    store_odd(out1 + j / 2, every_other<1>(lo, hi, std::make_index_sequence<L>{}));
  };
  int64_t j = 0;
  for (; j + 2 * L <= m; j += 2 * L) split(j, store<V, T>, store<V, T>);
  if constexpr (BYTES > 16) {
    if (m - j >= L) return deinterleave<T, BYTES / 2>(staged + j, m - j, out0 + j / 2, out1 + j / 2);
  }
  if (j < m) {
    const int n_even = static_cast<int>((m - j + 1) / 2), n_odd = static_cast<int>((m - j) / 2);
    split(j, [&](T* at, V v) { store_first(at, v, n_even); }, [&](T* at, V v) { store_first(at, v, n_odd); });
  }
}

// Input columns a staged chunk holds: a multiple of 2 (a stride-2 chunk's phases then start
// where the row's do), rows wider than that taking several.
constexpr int64_t kStagedColumns = 512;

// The planes of channel c of image n from an input whose rows are contiguous (NCHW), stride_w
// 1 or 2: the channel's planes (contiguous) zeroed in one pass, then every input row through
// the op once, written to its phase rows: directly for stride 1; staged, then deinterleaved,
// for stride 2. Per input row, not per plane row: a 16-wide row of a 4x4 stride-2 convolution
// costs one vectorised op and its shuffles, where plane rows of 8 would each pay a loop's
// set-up and their margins' fills. Returns whether a radius was invalid.
template <class T, int BYTES, PackOp OP>
ROBPRUNE_INLINE int pack_channel_rows(const Pack<T>& p, int64_t n, int64_t c) {
  const int64_t phases = p.stride_h * p.stride_w, plane = p.out_rows * p.out_cols;
  const int64_t at = (n * p.channels + c) * phases * plane;
  T* const y0 = p.out + at;
  T* const y1 = p.out1 ? p.out1 + at : nullptr;
  std::fill(y0, y0 + phases * plane, T(0));
  if (y1) std::fill(y1, y1 + phases * plane, T(0));
  alignas(64) T s0[kStagedColumns + 2 * BYTES / sizeof(T)], s1[kStagedColumns + 2 * BYTES / sizeof(T)];
  int bad = 0;
  for (int64_t yy = 0; yy < p.height; ++yy) {
    const int64_t padded = yy + p.top, a = padded % p.stride_h;
    // Row padded / stride_h of the planes of phase (a, b) starts at row_at(b).
    auto row_at = [&](int64_t b) { return ((a * p.stride_w + b) * p.out_rows + padded / p.stride_h) * p.out_cols; };
    const T* x0 = p.x + n * p.x_image + c * p.x_channel + yy * p.x_row;
    const T* x1 = p.x1 ? p.x1 + n * p.x_image + c * p.x_channel + yy * p.x_row : nullptr;
    if (p.stride_w == 1) {
      T* out0 = y0 + row_at(0) + p.left;
      T* out1 = y1 ? y1 + row_at(0) + p.left : nullptr;
#pragma omp simd reduction(| : bad)
      for (int64_t j = 0; j < p.width; ++j)
        bad |= pack_pair<T, OP>(x0 + j, x1 ? x1 + j : nullptr, out0 + j, out1 ? out1 + j : nullptr);
      continue;
    }
    for (int64_t j0 = 0; j0 < p.width; j0 += kStagedColumns) {
      const int64_t m = std::min(kStagedColumns, p.width - j0);
#pragma omp simd reduction(| : bad)
      for (int64_t j = 0; j < m; ++j)
        bad |= pack_pair<T, OP>(x0 + j0 + j, x1 ? x1 + j0 + j : nullptr, s0 + j, y1 ? s1 + j : nullptr);
      // Padded column j0 + left + j of phase (j0 + left + j) % 2, at column (j0 + left + j) / 2.
      const int64_t first = j0 + p.left, q = first / 2, b = first % 2;
      deinterleave<T, BYTES>(s0, m, y0 + row_at(b) + q, y0 + row_at(1 - b) + q + b);
      if (y1) deinterleave<T, BYTES>(s1, m, y1 + row_at(b) + q, y1 + row_at(1 - b) + q + b);
    }
  }
  return bad;
}

int64_t floor_div(int64_t a, int64_t b) {
  return a / b - (a % b != 0 && (a < 0) != (b < 0));
}

// Where channels are the input's inner dimension (a linear layer's (N, F) input, a
// channels-last image) a pack transposes: a task then takes a
// block of channels and moves L x L blocks (channels x output columns) through registers
// (transpose_block), the pair's op applied afterwards, in place. Elsewhere each plane row is a
// strided walk of the input.
constexpr int64_t kPackChannels = 256;

template <class T, int BYTES, PackOp OP>
ROBPRUNE_INLINE bool pack_tasks(const Pack<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t L = BYTES / sizeof(T);
  const int64_t phases = p.stride_h * p.stride_w, plane = p.out_rows * p.out_cols;
  const bool transposing = p.x_channel < p.x_col;
  const int64_t cb = transposing ? kPackChannels : 1, blocks = (p.channels + cb - 1) / cb;
  // Locals: stores through the planes could alias p, forcing reloads per element.
  const T* const x0 = p.x;
  const T* const x1 = p.x1;
  T* const out0 = p.out;
  T* const out1 = p.out1;
  const int64_t channel = p.x_channel, step = p.stride_w * p.x_col, cols = p.out_cols;
  bool bad = false;
  if (!transposing && p.x_col == 1 && p.stride_w <= 2) {
    for (int64_t t = begin; t < end; ++t) bad |= pack_channel_rows<T, BYTES, OP>(p, t / p.channels, t % p.channels);
    return bad;
  }
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks, c0 = t % blocks * cb, count = std::min(cb, p.channels - c0);
    for (int64_t phase = 0; phase < phases; ++phase) {
      const int64_t a = phase / p.stride_w, b = phase % p.stride_w;
      // Columns q with 0 <= q * stride_w + b - left < width.
      const int64_t first = std::clamp<int64_t>(-floor_div(b - p.left, p.stride_w), 0, cols);
      const int64_t last = std::clamp<int64_t>(floor_div(p.width - 1 + p.left - b, p.stride_w) + 1, first, cols);
      for (int64_t r = 0; r < p.out_rows; ++r) {
        const int64_t y = r * p.stride_h + a - p.top;
        const bool inside = y >= 0 && y < p.height;
        const int64_t lo = inside ? first : cols, hi = inside ? last : cols;
        // Row r of plane (n, c0 + c, phase) starts at row_at + c * channel_at.
        const int64_t row_at = ((n * p.channels + c0) * phases + phase) * plane + r * cols;
        const int64_t channel_at = phases * plane;
        for (int64_t c = 0; c < count; ++c) {
          T* row = out0 + row_at + c * channel_at;
          std::fill(row, row + lo, T(0));
          std::fill(row + hi, row + cols, T(0));
          if (out1) {
            T* row1 = out1 + row_at + c * channel_at;
            std::fill(row1, row1 + lo, T(0));
            std::fill(row1 + hi, row1 + cols, T(0));
          }
        }
        // Input element of channel c0 + c, column q: at + (q - lo) * step + c * channel.
        const int64_t at = n * p.x_image + c0 * channel + y * p.x_row + (lo * p.stride_w + b - p.left) * p.x_col;
        if (!transposing) {
          for (int64_t c = 0; c < count; ++c) {
            const int64_t src = at + c * channel - lo * step, dst = row_at + c * channel_at;
            if (OP == PackOp::kCopy && !x1 && step == 1) {
              std::copy(x0 + src + lo, x0 + src + hi, out0 + dst + lo);
              continue;
            }
            int local = 0;
            if (x1 && step == 1) {  // a contiguous pair (NCHW): vectorised
              const T* a = x0 + src;
              const T* b1 = x1 + src;
              T* y0 = out0 + dst;
              T* y1 = out1 + dst;
#pragma omp simd reduction(| : local)
              for (int64_t q = lo; q < hi; ++q) local |= pack_pair<T, OP>(a + q, b1 + q, y0 + q, y1 + q);
            } else {
              for (int64_t q = lo; q < hi; ++q)
                local |= pack_pair<T, OP>(x0 + src + q * step, x1 ? x1 + src + q * step : nullptr, out0 + dst + q,
                                          out1 ? out1 + dst + q : nullptr);
            }
            bad |= local;
          }
          continue;
        }
        // Transposing: the pair's operands moved as they are, then the op applied in place.
        auto move = [&](const T* x, T* out) {
          for (int64_t q0 = lo; q0 < hi; q0 += L)
            for (int64_t c = 0; c < count; c += L) {
              const T* src = x + at + (q0 - lo) * step + c * channel;
              T* dst = out + row_at + c * channel_at + q0;
              if (channel == 1 && q0 + L <= hi && c + L <= count) {
                transpose_block<T, BYTES>(src, step, dst, channel_at);
                continue;
              }
              for (int64_t i = 0; i < std::min(L, count - c); ++i)
                for (int64_t j = 0; j < std::min(L, hi - q0); ++j)
                  dst[i * channel_at + j] = src[j * step + i * channel];
            }
        };
        move(x0, out0);
        if (x1) move(x1, out1);
        if (OP != PackOp::kCopy)
          for (int64_t c = 0; c < count; ++c) {
            T* y0 = out0 + row_at + c * channel_at;
            T* y1 = out1 + row_at + c * channel_at;
            int local = 0;
#pragma omp simd reduction(| : local)
            for (int64_t q = lo; q < hi; ++q) local |= pack_pair<T, OP>(y0 + q, y1 + q, y0 + q, y1 + q);
            bad |= local;
          }
      }
    }
  }
  return bad;
}

// ---- Unphase ------------------------------------------------------------------------------------

// The zip of two vectors: lanes a0, b0, a1, b1, ... of their low halves, or of their high halves.
template <bool HIGH, class V, size_t... J>
ROBPRUNE_INLINE V zip_half(V a, V b, std::index_sequence<J...>) {
  constexpr int L = sizeof...(J);
  return __builtin_shufflevector(a, b, int((J % 2 ? L : 0) + (HIGH ? L / 2 : 0) + J / 2)...);
}

// staged[2k] = even[k], staged[2k + 1] = odd[k] for 2k, 2k + 1 < m, whole vectors at a time:
// reads past the rows' ends (an Unphase's regions have room after them) and writes past m
// (the staging row has room).
template <class T, int BYTES>
ROBPRUNE_INLINE void interleave(const T* even, const T* odd, int64_t m, T* staged) {
  using V = Vec<T, BYTES>;
  constexpr int64_t L = BYTES / sizeof(T);
  for (int64_t j = 0; j < m; j += 2 * L) {
    const V e = load<V>(even + j / 2), o = load<V>(odd + j / 2);
    store(staged + j, zip_half<false>(e, o, std::make_index_sequence<L>{}));
    store(staged + j + L, zip_half<true>(e, o, std::make_index_sequence<L>{}));
  }
}

// Channel nc (image * channels + channel) of an Unphase with stride_w 2: every output row from
// its two phases' region rows (columns of residue 0 and 1), interleaved by shuffles into a
// staged row, then through the pair's op (the ReLU's gradient reads the box's row).
template <class T, int BYTES, bool RELU>
ROBPRUNE_INLINE void unphase_channel_rows(const Unphase<T>& p, int64_t nc) {
  constexpr int64_t L = BYTES / sizeof(T);
  alignas(64) T s0[kStagedColumns + 2 * L], s1[kStagedColumns + 2 * L];
  const int64_t region = p.rows * p.cols, b_even = p.pad_w % 2, b_odd = (1 + p.pad_w) % 2;
  for (int64_t y = 0; y < p.height; ++y) {
    const int64_t a = (y % p.stride_h + p.pad_h) % p.stride_h, row = y / p.stride_h * p.cols;
    const int64_t even_at = ((nc * p.stride_h + a) * 2 + b_even) * region + row;
    const int64_t odd_at = ((nc * p.stride_h + a) * 2 + b_odd) * region + row;
    const int64_t out_at = (nc * p.height + y) * p.width;
    for (int64_t j0 = 0; j0 < p.width; j0 += kStagedColumns) {
      const int64_t m = std::min(kStagedColumns, p.width - j0);
      interleave<T, BYTES>(p.z + even_at + j0 / 2, p.z + odd_at + j0 / 2, m, s0);
      if (p.z1) interleave<T, BYTES>(p.z1 + even_at + j0 / 2, p.z1 + odd_at + j0 / 2, m, s1);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) unphase_pair<T, RELU>(p, s0 + j, s1 + j, out_at + j0 + j);
    }
  }
}

// ---- index checks -----------------------------------------------------------------------------

// Plain loops the ISA's compilation vectorises: int compares and min / max reductions.
ROBPRUNE_INLINE bool segments_sorted(const int32_t* ptr, int64_t begin, int64_t end, const int32_t* inner,
                                     int64_t limit) {
  int bad = 0;
  for (int64_t s = begin; s < end; ++s) {
    const int32_t first = ptr[s], stop = ptr[s + 1];
    if (first == stop) continue;
    bad |= inner[first] < 0 || inner[stop - 1] >= limit;
    const int32_t* a = inner + first;
    const int64_t pairs = stop - first - 1;
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < pairs; ++i) bad |= a[i + 1] <= a[i];
  }
  return !bad;
}

ROBPRUNE_INLINE bool indices_in_range(const int32_t* index, int64_t begin, int64_t end, int64_t limit) {
  int32_t lo = 0, hi = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t i = begin; i < end; ++i) {
    lo = std::min(lo, index[i]);
    hi = std::max(hi, index[i]);
  }
  return lo >= 0 && hi < limit;
}

// ---- the three instruction sets ---------------------------------------------------------------
//
// Each compiles the loops above for its vector width (flatten: everything they call, inlined,
// is compiled for the ISA too). REGS: vector registers the accumulators of a Product tile may
// take, leaving the rest to the weights and addresses.

#define ROBPRUNE_ISA(NAME, TARGET, BYTES, REGS)                                                   \
  struct NAME {                                                                                 \
    static constexpr int kBytes = BYTES, kRegs = REGS;                                          \
    template <class T, int B, int RR, int VC, int U, bool INTERVAL>                             \
    TARGET __attribute__((flatten)) static void planes(const Product<T>& p, int64_t b, int64_t e) { \
      plane_tasks<T, B, RR, VC, U, INTERVAL>(p, b, e);                                          \
    }                                                                                           \
    template <class T, int VC, int U, bool INTERVAL>                                            \
    TARGET __attribute__((flatten)) static void rows(const Product<T>& p, int64_t b, int64_t e) { \
      row_tasks<T, BYTES, VC, U, INTERVAL>(p, b, e);                                            \
    }                                                                                           \
    template <class T, int VC, bool INTERVAL>                                                   \
    TARGET __attribute__((flatten)) static void row_dots(const Product<T>& p, int64_t b, int64_t e) { \
      row_dot_tasks<T, BYTES, VC, INTERVAL>(p, b, e);                                           \
    }                                                                                           \
    template <class T, PackOp OP>                                                               \
    TARGET __attribute__((flatten)) static bool pack(const Pack<T>& p, int64_t b, int64_t e) {  \
      return pack_tasks<T, BYTES, OP>(p, b, e);                                                 \
    }                                                                                           \
    template <class T, bool RELU>                                                               \
    TARGET __attribute__((flatten)) static void unphase(const Unphase<T>& p, int64_t b, int64_t e) { \
      for (int64_t nc = b; nc < e; ++nc) unphase_channel_rows<T, BYTES, RELU>(p, nc);            \
    }                                                                                           \
    TARGET __attribute__((flatten)) static bool sorted(const int32_t* ptr, int64_t b, int64_t e,  \
                                                       const int32_t* inner, int64_t limit) {   \
      return segments_sorted(ptr, b, e, inner, limit);                                          \
    }                                                                                           \
    TARGET __attribute__((flatten)) static bool in_range(const int32_t* index, int64_t b, int64_t e, \
                                                         int64_t limit) {                        \
      return indices_in_range(index, b, e, limit);                                              \
    }                                                                                           \
    template <class T, bool INTERVAL>                                                           \
    TARGET __attribute__((flatten)) static void dot(const Dot<T>& p, int64_t b, int64_t e) {     \
      dot_channels<T, BYTES, REGS, INTERVAL>(p, b, e);                                          \
    }                                                                                           \
  };

ROBPRUNE_ISA(Avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), 64, 16)
ROBPRUNE_ISA(Avx2, __attribute__((target("avx2,fma"))), 32, 12)
ROBPRUNE_ISA(Baseline, , 16, 12)
#undef ROBPRUNE_ISA

enum class Isa { kGeneric, kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const Isa best = avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  const char* env = std::getenv("ROBPRUNE_SIMD");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  const Isa asked = want == "avx512"    ? Isa::kAvx512
                    : want == "avx2"    ? Isa::kAvx2
                    : want == "generic" ? Isa::kGeneric
                                        : Isa::kBaseline;
  TORCH_CHECK(want == "avx512" || want == "avx2" || want == "baseline" || want == "generic",
              "ROBPRUNE_SIMD must be avx512, avx2, baseline or generic, got '", want, "'");
  TORCH_CHECK(asked <= best, "ROBPRUNE_SIMD=", want, " but this CPU lacks its instructions");
  return asked;
}

// The instruction set, picked once per process.
Isa isa() {
  static const Isa picked = detect_isa();
  return picked;
}

bool generic() {
  return isa() == Isa::kGeneric;
}

// Runs f(Isa tag) with the SIMD instruction set (never generic: callers take the generic
// kernels first).
template <class F>
void with_isa(F&& f) {
  switch (isa()) {
    case Isa::kAvx512: return f(Avx512{});
    case Isa::kAvx2: return f(Avx2{});
    default: return f(Baseline{});
  }
}

// with_isa for the kernels of a Product or Dot: f(Isa tag, interval as std::bool_constant).
template <class F>
void with_isa_interval(bool interval, F&& f) {
  with_isa([&](auto isa) {
    if (interval) f(isa, std::true_type{});
    else f(isa, std::false_type{});
  });
}

// f(Int<k>) for k, a power of two up to MAX (the largest such power below k when k is not).
template <int MAX, class F>
void with_pow2(int k, F&& f) {
  if constexpr (MAX >= 16) if (k >= 16) return f(Int<16>{});
  if constexpr (MAX >= 8) if (k >= 8) return f(Int<8>{});
  if constexpr (MAX >= 4) if (k >= 4) return f(Int<4>{});
  if constexpr (MAX >= 2) if (k >= 2) return f(Int<2>{});
  f(Int<1>{});
}

int pow2_ceil(int64_t k) {
  int p = 1;
  while (p < k && p < 16) p *= 2;
  return p;
}

// Tasks per parallel chunk: enough work to amortise a thread's start.
int64_t grain(int64_t work_per_task) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_task, 1));
}

// FMA chains a tile needs in flight to hide the FMA latency (4 cycles, 2 per cycle).
constexpr int kChains = 8;

// Bytes of input a chunk of one-row planes may span: half of a 2 MiB L2, the rest for the
// output's and the other operands' lines.
constexpr int64_t kChunkBytes = 1 << 20;

template <class Isa, class T, bool INTERVAL>
void run_product(const Product<T>& p) {
  constexpr int L = Isa::kBytes / sizeof(T), CAP = Isa::kRegs / (INTERVAL ? 2 : 1);
  constexpr int VMAX = CAP >= 8 ? 8 : CAP >= 4 ? 4 : 2;
  const int vectors = pow2_ceil((p.cols + L - 1) / L);
  const int64_t per_entry = std::max<int64_t>(1, p.start[p.channels] / std::max<int64_t>(p.channels, 1));
  if (p.indexed && p.dw) {
    // With dw: the whole batch in registers when it fits (the channel's own rows, the
    // accumulators and the loaded rows: 3 x VC of the registers per operand), else chunks of it.
    constexpr int VD = (Isa::kRegs >= 16 ? 8 : 4) / (INTERVAL ? 2 : 1);
    with_pow2<VD>(std::min(vectors, VD), [&](auto VC) {
      constexpr int kVC = decltype(VC)::value;
      at::parallel_for(0, (p.channels + L - 1) / L, grain(L * p.cols * per_entry * 2), [&](int64_t b, int64_t e) {
        Isa::template row_dots<T, kVC, INTERVAL>(p, b, e);
      });
    });
    return;
  }
  if (p.indexed) {
    // One-row planes: chunks of the batch as wide as the L2 budget allows for the input's rows
    // (of both operands with interval), at most 4 vectors (so several chains), at least one.
    const int64_t row_bytes = int64_t(Isa::kBytes) * (INTERVAL ? 2 : 1) * std::max<int64_t>(p.index_rows, 1);
    const int fit = static_cast<int>(std::clamp<int64_t>(kChunkBytes / row_bytes, 1, 4));
    with_pow2<4>(std::min(vectors, fit), [&](auto VC) {
      constexpr int kVC = decltype(VC)::value, kU = std::max(1, std::min(kChains, CAP) / kVC);
      const int64_t chunks = (p.cols + kVC * L - 1) / (kVC * L), groups = (p.channels + L - 1) / L;
      at::parallel_for(0, chunks * groups, grain(L * kVC * L * per_entry), [&](int64_t b, int64_t e) {
        Isa::template rows<T, kVC, kU, INTERVAL>(p, b, e);
      });
    });
    return;
  }
  // Vectors per row of the tile: the row's width, rounded up to a power of two, at most VMAX
  // (wider rows take several column blocks). Rows per tile: as many as the registers hold,
  // but never past the region where the input may not be read beyond it. Rows at most half a
  // vector wide (an 8x8 output plane under AVX-512) take vectors half as wide, not half empty.
  const int vc = std::min(vectors, VMAX);
  const int rr = p.overread ? std::min(pow2_ceil(p.rows), CAP / vc) : 1;
  auto tiles = [&](auto B) {
    with_pow2<VMAX>(vc, [&](auto VC) {
      with_pow2<CAP / decltype(VC)::value>(rr, [&](auto RR) {
        constexpr int kRR = decltype(RR)::value, kVC = decltype(VC)::value;
        constexpr int kU = std::max(1, std::min(kChains, CAP) / (kRR * kVC));
        const int64_t tasks = p.images * p.channels * ((p.rows + kRR - 1) / kRR);
        at::parallel_for(0, tasks, grain(kRR * p.cols * per_entry), [&](int64_t b, int64_t e) {
          Isa::template planes<T, decltype(B)::value, kRR, kVC, kU, INTERVAL>(p, b, e);
        });
      });
    });
  };
  if constexpr (Isa::kBytes > 16) {
    if (p.cols * int64_t(sizeof(T)) * 2 <= Isa::kBytes) return tiles(Int<Isa::kBytes / 2>{});
  }
  tiles(Int<Isa::kBytes>{});
}

// The Dot in one parallel region over channels; a task walks the images one after the other
// and, within an image, its channels, which all read that image's input planes while they are
// in cache; the images add up in dw.
template <class Isa, class T, bool INTERVAL>
void run_dot(const Dot<T>& p) {
  const int64_t per_entry = std::max<int64_t>(1, p.start[p.channels] / std::max<int64_t>(p.channels, 1));
  const int64_t per_channel = p.images * p.rows * p.cols * per_entry;
  at::parallel_for(0, p.channels, grain(per_channel), [&](int64_t b, int64_t e) {
    Isa::template dot<T, INTERVAL>(p, b, e);
  });
  if (p.images == 0) {  // every product and sum is empty
    for (int32_t e = 0; e < p.start[p.channels]; ++e) p.dw[slot(p, e)] = T(0);
    if (p.db) std::fill(p.db, p.db + p.channels, T(0));
  }
}

// Tasks of pack_tasks: blocks of channels of one image.
template <class Isa, class T, PackOp OP>
bool run_pack(const Pack<T>& p) {
  const int64_t cb = p.x_channel < p.x_col ? kPackChannels : 1;
  const int64_t tasks = p.images * ((p.channels + cb - 1) / cb);
  std::atomic<bool> bad{false};
  at::parallel_for(0, tasks, grain(cb * p.stride_h * p.stride_w * p.out_rows * p.out_cols),
                   [&](int64_t begin, int64_t end) {
                     if (Isa::template pack<T, OP>(p, begin, end)) bad.store(true, std::memory_order_relaxed);
                   });
  return bad.load();
}

// Samples [c, c + S) of channel o of a Product whose columns are col_stride apart (a small
// batch of a linear layer's input read in place, a sample per column: sparse_planes.h): sums
// over the channel's entries with scalar loads from the samples' rows, which stay in L1, each
// entry's weight and index loaded once for the S samples. K partial sums per sample take turns
// (S * K independent FMA chains).
template <class T, bool INTERVAL, int S>
ROBPRUNE_INLINE void in_place_samples(const Product<T>& p, int64_t o, int64_t c) {
  constexpr int K = 4;
  const T* x[S];
  const T* x1[S];
  for (int s = 0; s < S; ++s) {
    x[s] = p.in + (c + s) * p.col_stride;
    x1[s] = INTERVAL ? p.in1 + (c + s) * p.col_stride : nullptr;
  }
  T a[S][K] = {}, z[S][K] = {};
  auto add = [&](int u, int32_t e) {
    const T w = p.w[slot(p, e)];
    const int64_t at = int64_t(p.index[e]) * p.index_stride;
    for (int s = 0; s < S; ++s) {
      a[s][u] += w * x[s][at];
      if constexpr (INTERVAL) z[s][u] += std::abs(w) * x1[s][at];
    }
  };
  const int32_t e1 = p.start[o + 1];
  int32_t e = p.start[o];
  for (; e + K <= e1; e += K)
    for (int u = 0; u < K; ++u) add(u, e + u);
  for (; e < e1; ++e) add(0, e);
  for (int s = 0; s < S; ++s) {
    T sum = p.bias ? p.bias[o] : T(0), radius = T(0);
    for (int u = 0; u < K; ++u) {
      sum += a[s][u];
      radius += z[s][u];
    }
    if (INTERVAL && p.out_bounds) {
      const T lower = sum - radius;
      radius = sum + radius;
      sum = lower;
    }
    p.out[(c + s) * p.out_row + o] = sum;
    if (INTERVAL) p.out1[(c + s) * p.out_row + o] = radius;
  }
}

// in_place_samples over every channel (threads over channels) and sample, two samples at a time
// (where the vectors over the batch would be mostly empty: at batch 1 a 90%-pruned linear
// 4096->512 ran slower than dense that way). Four at a time gained too little to move the
// switch past 2 samples (sparse_planes.h).
template <class T, bool INTERVAL>
void in_place_rows(const Product<T>& p) {
  const int64_t per_entry = std::max<int64_t>(1, p.start[p.channels] / std::max<int64_t>(p.channels, 1));
  at::parallel_for(0, p.channels, grain(p.cols * per_entry), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t c = 0;
      for (; c + 2 <= p.cols; c += 2) in_place_samples<T, INTERVAL, 2>(p, o, c);
      if (c < p.cols) in_place_samples<T, INTERVAL, 1>(p, o, c);
    }
  });
}

}  // namespace

using Generic = GenericSparseKernels<CpuBackend>;

template <>
template <class T>
void SparseKernels<CpuBackend>::product(const Product<T>& p) {
  if (generic()) return Generic::product(p);
  if (p.images * p.channels * p.rows * p.cols == 0) {  // every sum is empty
    if (p.dw)
      for (int32_t e = 0; e < p.start[p.channels]; ++e) p.dw[p.perm[e]] = T(0);
    return;
  }
  if (p.indexed && p.col_stride != 1) {
    TORCH_INTERNAL_ASSERT(!p.dw, "the weights' gradient rides only along batch-contiguous rows");
    if (p.interval) in_place_rows<T, true>(p);
    else in_place_rows<T, false>(p);
    return;
  }
  with_isa_interval(p.interval, [&](auto isa, auto interval) {
    run_product<decltype(isa), T, decltype(interval)::value>(p);
  });
}

template <>
template <class T>
void SparseKernels<CpuBackend>::dot(const Dot<T>& p) {
  if (generic()) return Generic::dot(p);
  if (p.channels == 0) return;
  with_isa_interval(p.interval, [&](auto isa, auto interval) {
    run_dot<decltype(isa), T, decltype(interval)::value>(p);
  });
}

template <>
template <class T>
bool SparseKernels<CpuBackend>::pack(const Pack<T>& p) {
  if (generic()) return Generic::pack(p);
  bool bad = false;
  with_isa([&](auto isa) {
    using I = decltype(isa);
    switch (p.op) {
      case PackOp::kReluBox: bad = run_pack<I, T, PackOp::kReluBox>(p); break;
      case PackOp::kCheckBox: bad = run_pack<I, T, PackOp::kCheckBox>(p); break;
      case PackOp::kBoundsGrad: bad = run_pack<I, T, PackOp::kBoundsGrad>(p); break;
      default: bad = run_pack<I, T, PackOp::kCopy>(p);
    }
  });
  return bad;
}

template <>
template <class T>
void SparseKernels<CpuBackend>::unphase(const Unphase<T>& p) {
  if (generic() || p.stride_w != 2) return Generic::unphase(p);  // other strides: rare, elementwise
  with_isa([&](auto isa) {
    using I = decltype(isa);
    at::parallel_for(0, p.images * p.channels, grain(p.height * p.width), [&](int64_t b, int64_t e) {
      if (p.center) I::template unphase<T, true>(p, b, e);
      else I::template unphase<T, false>(p, b, e);
    });
  });
}

// A row of W2 per step, rows spread over the threads: no search for an entry's row (the generic
// kernel's), and scatter's zeros and values go to a row while it is in L1 (one pass over the
// dense gradient, where zeroing it first and putting the values after took two).
template <class T, bool TO_DENSE>
void kept_rows(const Kept<T>& p) {
  at::parallel_for(0, p.rows, grain(p.cols), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      T* row = p.dense + o * p.cols;
      const int32_t* col = p.col;
      T* values = p.values;
      if constexpr (TO_DENSE) std::fill(row, row + p.cols, T(0));
      for (int32_t k = p.row_ptr[o], end = p.row_ptr[o + 1]; k < end; ++k) {
        if constexpr (TO_DENSE) row[col[k]] = values[k];
        else values[k] = row[col[k]];
      }
    }
  });
}

template <>
template <class T>
void SparseKernels<CpuBackend>::gather(const Kept<T>& p) {
  if (generic()) return Generic::gather(p);
  kept_rows<T, false>(p);
}

template <>
template <class T>
void SparseKernels<CpuBackend>::scatter(const Kept<T>& p) {
  if (generic()) return Generic::scatter(p);
  kept_rows<T, true>(p);
}

// Indices a check task takes: vectorised, a pass over a million indices costs well under a
// millisecond, less than a parallel region may wait for a busy core.
constexpr int64_t kCheckGrain = 1 << 20;

template <>
bool SparseKernels<CpuBackend>::sorted_segments(const int32_t* ptr, int64_t segments, const int32_t* inner,
                                                 int64_t entries, int64_t limit) {
  if (generic()) return Generic::sorted_segments(ptr, segments, inner, entries, limit);
  std::atomic<bool> ok{true};
  with_isa([&](auto isa) {
    using I = decltype(isa);
    at::parallel_for(0, segments, std::max<int64_t>(1, segments * kCheckGrain / std::max<int64_t>(entries, 1)),
                     [&](int64_t b, int64_t e) {
                       if (!I::sorted(ptr, b, e, inner, limit)) ok.store(false, std::memory_order_relaxed);
                     });
  });
  return ok.load();
}

template <>
bool SparseKernels<CpuBackend>::in_range(const int32_t* index, int64_t n, int64_t limit) {
  if (generic()) return Generic::in_range(index, n, limit);
  std::atomic<bool> ok{true};
  with_isa([&](auto isa) {
    using I = decltype(isa);
    at::parallel_for(0, n, kCheckGrain, [&](int64_t b, int64_t e) {
      if (!I::in_range(index, b, e, limit)) ok.store(false, std::memory_order_relaxed);
    });
  });
  return ok.load();
}

ROBPRUNE_SPARSE_KERNELS_FOR(CpuBackend, float)
ROBPRUNE_SPARSE_KERNELS_FOR(CpuBackend, double)
// The generic kernels the CPU has no SIMD twin of.
template bool SparseKernels<CpuBackend>::pointers_valid(const int32_t*, int64_t, int64_t);
template void SparseKernels<CpuBackend>::forward_offsets(const ConvIndex&, int64_t*);
template void SparseKernels<CpuBackend>::transposed_counts(const ConvIndex&, int32_t*);

}  // namespace robprune
