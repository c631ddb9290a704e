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
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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
static_assert(std::has_unique_object_representations_v<PlaneView>, "compared with memcmp");

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
static_assert(std::has_unique_object_representations_v<PlaneGrid>, "compared with memcmp");

// The planes of x (and of x1, read with x's strides: a pair laid out alike), each a flat
// scratch buffer (slots `slot` and the next) with slack(grid.cols) zeros after the planes, on
// x's device; bad: an invalid radius was met (box ops).
struct Planes {
  at::Tensor a, b;
  bool bad = false;
};

// The input planes packed by the forwards whose backward will pack the same input again (the
// weights' gradient reads them), per thread (a CPU backward runs on the thread that calls it),
// at most kEntries: the last layers' inputs, whose backward comes first. An entry answers for
// the same input tensors (weak references: it never keeps an input alive, and a freed input's
// address is never taken for it while the entry holds one), at the same versions (no in-place
// change since, as autograd's saved tensors require), data pointers, view, grid and op: the
// planes a pack would write, bit for bit. An entry whose input is gone lends its buffers to the
// next forward, so a training step's forwards reuse the last step's memory; the least recently
// used entry goes when all are live. The buffers stay with the thread (at most kEntries of a
// layer's planes).
class RetainedPlanes {
 public:
  static constexpr size_t kEntries = 8;

  static RetainedPlanes& local() {
    thread_local RetainedPlanes pool;
    return pool;
  }

  RetainedPlanes() { entries_.reserve(kEntries); }  // pointers into entries_ stay valid

  // The planes of (x, x1) packed under (view, grid) by op, if an entry holds them. A copy is
  // served by a checked copy too (same planes), never the other way round (the check would be
  // skipped).
  const Planes* find(const at::Tensor& x, const at::Tensor& x1, const PlaneView& v, const PlaneGrid& g, PackOp op) {
    for (Entry& e : entries_)
      if (e.matches(x, x1, v, g, op)) {
        e.used = ++clock_;
        return &e.planes;
      }
    return nullptr;
  }

  // Buffers of at least n elements (two with pair) for a forward's pack.
  Planes& acquire(int64_t n, bool pair, const at::TensorOptions& options) {
    const auto dtype = options.dtype().toScalarType();
    auto holds = [&](const at::Tensor& buffer) {
      return buffer.defined() && buffer.numel() >= n && buffer.scalar_type() == dtype;
    };
    // A free entry whose buffers fit, the smallest (layers of several sizes keep theirs), else
    // a new entry, else the least recently used free one, else the least recently used.
    Entry* pick = nullptr;
    for (Entry& e : entries_)
      if (!e.live() && holds(e.planes.a) && (!pair || holds(e.planes.b)) &&
          (!pick || e.planes.a.numel() < pick->planes.a.numel()))
        pick = &e;
    if (!pick && entries_.size() < kEntries) pick = &entries_.emplace_back();
    for (int pass = 0; pass < 2 && !pick; ++pass)
      for (Entry& e : entries_)
        if ((pass == 1 || !e.live()) && (!pick || e.used < pick->used)) pick = &e;
    pick->forget();
    auto fit = [&](at::Tensor& buffer) {
      if (!holds(buffer)) buffer = at::empty({n}, options);
    };
    fit(pick->planes.a);
    if (pair) fit(pick->planes.b);
    pending_ = pick;
    return pick->planes;
  }

  // The entry of the last acquire() now answers for (x, x1) under (v, g, op); any older entry
  // of the same input goes (its planes may be of the input before a change .data made).
  void record(const at::Tensor& x, const at::Tensor& x1, const PlaneView& v, const PlaneGrid& g, PackOp op) {
    for (Entry& e : entries_)
      if (&e != pending_ && e.keyed && Entry::same(e.x, x)) e.forget();
    pending_->remember(x, x1, v, g, op);
    pending_->used = ++clock_;
    pending_ = nullptr;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

  struct Entry {
    Weak x{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    Weak x1{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t x_version = -1, x1_version = -1;
    const void* x_data = nullptr;
    const void* x1_data = nullptr;
    PlaneView view{};
    PlaneGrid grid{};
    PackOp op = PackOp::kCopy;
    bool keyed = false, pair = false;
    Planes planes;
    uint64_t used = 0;

    bool live() const { return keyed && !x.expired() && (!pair || !x1.expired()); }
    void forget() {
      keyed = false;
      x = x1 = Weak(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>());
    }
    static bool same(const Weak& w, const at::Tensor& t) {
      auto held = w.lock();
      return held.defined() && held.get() == t.unsafeGetTensorImpl();
    }
    bool matches(const at::Tensor& t, const at::Tensor& t1, const PlaneView& v, const PlaneGrid& g, PackOp o) const {
      const bool serves = o == op || (o == PackOp::kCopy && op == PackOp::kCheckBox);
      if (!keyed || !serves || t.data_ptr() != x_data || t._version() != x_version || !same(x, t)) return false;
      if (t1.defined() != pair) return false;
      if (t1.defined() && (t1.data_ptr() != x1_data || t1._version() != x1_version || !same(x1, t1))) return false;
      return std::memcmp(&v, &view, sizeof v) == 0 && std::memcmp(&g, &grid, sizeof g) == 0;
    }
    void remember(const at::Tensor& t, const at::Tensor& t1, const PlaneView& v, const PlaneGrid& g, PackOp o) {
      x = Weak(t.getIntrusivePtr());
      x_version = t._version();
      x_data = t.data_ptr();
      pair = t1.defined();
      if (pair) {
        x1 = Weak(t1.getIntrusivePtr());
        x1_version = t1._version();
        x1_data = t1.data_ptr();
      }
      view = v;
      grid = g;
      op = o;
      keyed = true;
    }
  };

  std::vector<Entry> entries_;
  Entry* pending_ = nullptr;
  uint64_t clock_ = 0;
};

// The elements of the planes a Pack writes under (v, g), and the slack after them.
inline int64_t planes_numel(const PlaneView& v, const PlaneGrid& g) {
  return v.images * v.channels * g.stride_h * g.stride_w * g.rows * g.cols + slack(g.cols);
}

// The planes of x (and x1) through op, written to out's buffers (planes_numel elements each).
inline Planes pack_into(Planes out, const at::Tensor& x, const at::Tensor& x1, const PlaneView& v,
                        const PlaneGrid& g, PackOp op) {
  const int64_t extra = slack(g.cols), n = planes_numel(v, g) - extra;
  out.a.narrow(0, n, extra).zero_();
  if (x1.defined()) out.b.narrow(0, n, extra).zero_();
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

// The planes of x (and x1) in the scratch slots from `slot` on.
inline Planes pack_planes(const at::Tensor& x, const at::Tensor& x1, const PlaneView& v, const PlaneGrid& g,
                          PackOp op, Scratch slot) {
  const int64_t n = planes_numel(v, g);
  Planes out;
  out.a = scratch(slot, n, x.options());
  if (x1.defined()) out.b = scratch(static_cast<Scratch>(static_cast<int>(slot) + 1), n, x.options());
  return pack_into(out, x, x1, v, g, op);
}

// x1 with x's strides (a copy when they differ), so that one Pack reads both.
inline at::Tensor strided_like(const at::Tensor& x1, const at::Tensor& x) {
  return x1.strides() == x.strides() ? x1 : at::empty_like(x).copy_(x1);
}

// Where a layer's input planes go, or come from (RetainedPlanes, on the CPU): a scratch slot
// (kScratch: nothing will ask for them again); a retained buffer (kKeep: a forward whose
// weights' gradient autograd will ask for); an entry a forward kept, else a scratch slot
// (kReuse: that gradient, in the backward). Only backward ops reuse: a forward repeated on an
// input changed through .data (no version bump: an attack's step, gradcheck's perturbations)
// must see the change, as the dense layer would.
enum class PlanesUse { kScratch, kKeep, kReuse };

// The planes of a layer's input x (and x1, laid out alike) under (v, g) through op, per use.
inline Planes kept_planes(const at::Tensor& x, const at::Tensor& x1, const PlaneView& v, const PlaneGrid& g,
                          PackOp op, PlanesUse use) {
  if (!x.is_cpu() || use == PlanesUse::kScratch) return pack_planes(x, x1, v, g, op, Scratch::kInput);
  RetainedPlanes& pool = RetainedPlanes::local();
  const int64_t n = planes_numel(v, g);
  if (use == PlanesUse::kReuse) {
    if (const Planes* hit = pool.find(x, x1, v, g, op))
      return {hit->a.narrow(0, 0, n), x1.defined() ? hit->b.narrow(0, 0, n) : at::Tensor(), false};
    return pack_planes(x, x1, v, g, op, Scratch::kInput);
  }
  const Planes& buffers = pool.acquire(n, x1.defined(), x.options());
  const Planes out = pack_into({buffers.a.narrow(0, 0, n), x1.defined() ? buffers.b.narrow(0, 0, n) : at::Tensor()},
                               x, x1, v, g, op);
  if (!out.bad) pool.record(x, x1, v, g, op);
  return out;
}

// The input planes of a convolution (and of the second operand of a pair).
inline Planes input_planes(const at::Tensor& x, const at::Tensor& x1, const ConvLayout& l, PackOp op,
                           PlanesUse use = PlanesUse::kScratch) {
  return kept_planes(x, x1.defined() ? strided_like(x1, x) : x1, conv_view(x),
                     {l.h.stride, l.w.stride, l.h.pad, l.w.pad, l.rows_q(), l.cols_q()}, op, use);
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

// A linear layer's operand as the products read it: entry e's row at index[e] * ld, sample c at
// c * col_stride from there.
struct Batch {
  Planes rows;
  int64_t ld;
  int64_t col_stride = 1;
};

// x (and x1, laid out alike after strided_like) through a Pack op, as batch-contiguous rows
// in scratch slots from `slot` on (kInput for a layer's input, kGradient for its output's
// gradient); a layer's input per `use` (kept_planes).
inline Batch batch_rows(const at::Tensor& x, const at::Tensor& x1, PackOp op, Scratch slot,
                        PlanesUse use = PlanesUse::kScratch) {
  const int64_t ld = batch_ld(x.size(0), x.element_size());
  const at::Tensor y1 = x1.defined() ? strided_like(x1, x) : x1;
  const PlaneView v = batch_view(x);
  const PlaneGrid g{1, 1, 0, 0, 1, ld};
  TORCH_INTERNAL_ASSERT(use == PlanesUse::kScratch || slot == Scratch::kInput, "only a layer's input is kept");
  return {use == PlanesUse::kScratch ? pack_planes(x, y1, v, g, op, slot) : kept_planes(x, y1, v, g, op, use), ld};
}

// A small batch of a layer's input as it is, sample by sample (x (N, F): N rows of F features,
// through the Pack op), for the products that read each sample's row in place: a batch below
// kRowsInPlace samples on the CPU, where the kernels' vectors over the batch would be mostly
// empty, and only in a forward that keeps nothing for a backward. Linear 4096->512 on the
// 2-core Xeon, in place vs batch-contiguous, one process: 237 vs 353 us at batch 1, 257 vs 354
// at batch 2 and 434 vs 373 at batch 4 at 90% sparsity (the in-place kernel's cost grows with
// the samples, the other's hardly); at 99% 74 vs 136 us at batch 1, 99 vs 149 at batch 4.
constexpr int64_t kRowsInPlace = 3;

inline bool reads_rows_in_place(const at::Tensor& x, PlanesUse use) {
  return x.is_cpu() && x.size(0) < kRowsInPlace && use == PlanesUse::kScratch;
}

inline Batch sample_rows(const at::Tensor& x, const at::Tensor& x1, PackOp op) {
  const at::Tensor y1 = x1.defined() ? strided_like(x1, x) : x1;
  const PlaneView v{1, x.size(0), 1, x.size(1), 0, x.stride(0), 0, x.stride(1)};
  const PlaneGrid g{1, 1, 0, 0, 1, x.size(1)};
  return {pack_planes(x, y1, v, g, op, Scratch::kInput), 1, x.size(1)};
}

}  // namespace robprune
