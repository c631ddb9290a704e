// The compressed weight of the ops' arguments: checks of its index tensors, and the per-call
// entry lists (sparse_kernels.h) the kernels walk.
//
// A layer's weight W2 (out rows, cols columns: in_features for a linear layer, C_in / groups *
// kH * kW for a convolution) keeps nnz weights, given twice by the Python layer
// (robprune_fast.ops.sparse.pack_mask): CSR over the rows (row_ptr [out + 1], col [nnz], the
// values in this order) and CSC over the columns (col_ptr [cols + 1], row [nnz], csc_to_csr
// [nnz]: CSC entry e holds the value values[csc_to_csr[e]]). All index tensors are int32 on the
// values' device. The checks below read only what the kernels would otherwise trust: every
// index is in range, so no call can read or write outside its tensors (a CSC that is not the
// CSR's transpose gives wrong numbers, never a crash). The passes over the indices are kernels
// (sparse_kernels.h), so they vectorise like the rest; CPU tensors only, as the ops.
#pragma once

#include "sparse_kernels.h"

#include <robprune/checks.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace robprune {

// A 1-D int32 tensor of `size` entries (`what`: what the size is, for messages) on ref's
// device, returned contiguous.
inline at::Tensor check_index(const at::Tensor& t, const char* name, int64_t size, const std::string& what,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, name, " must have shape (", size, ",) (", what,
              "), got ", t.sizes());
  return t.contiguous();
}

// The number of segments (rows of a CSR, columns of a CSC) a pointer tensor describes, before
// its full check: its length less one.
inline int64_t segments(const at::Tensor& ptr, const char* name) {
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) >= 1, name, " must be 1-D with at least one entry, got shape ",
              ptr.sizes());
  return ptr.size(0) - 1;
}

// values: 1-D, dtype and device of ref, fewer than 2^31 entries (the indices are int32).
inline void check_values(const at::Tensor& values, const at::Tensor& ref, const char* ref_name) {
  check_like(values, "values", ref, ref_name);
  TORCH_CHECK(values.dim() == 1, "values must be 1-D (the kept weights), got shape ", values.sizes());
  TORCH_CHECK(values.numel() < (int64_t(1) << 31), "values must hold fewer than 2^31 weights, got ",
              values.numel());
}

// ptr [segments + 1] must start at 0, never decrease and end at nnz.
inline void check_pointers(const at::Tensor& ptr, const char* name, int64_t nnz) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t n = ptr.numel() - 1;
  bool ok = p[0] == 0 && p[n] == nnz;
  for (int64_t i = 0; i < n && ok; ++i) ok = p[i] <= p[i + 1];
  TORCH_CHECK(ok, name, " must start at 0, never decrease and end at the number of kept weights (", nnz, ")");
}

// Refuses the call with `message` unless every entry of t (int32) lies in [0, limit).
inline void check_range(const at::Tensor& t, int64_t limit, const std::string& message) {
  TORCH_CHECK(SparseKernels<CpuBackend>::in_range(t.const_data_ptr<int32_t>(), t.numel(), limit), message);
}

// Every segment of ptr (a CSR's rows, a CSC's columns) must hold strictly increasing inner
// indices in [0, limit): the order pack_mask makes, and in range. One pass: the first and last
// of a sorted segment bound the others.
inline void check_segments(const at::Tensor& ptr, const at::Tensor& inner, int64_t limit, const std::string& message) {
  TORCH_CHECK(SparseKernels<CpuBackend>::sorted_segments(ptr.const_data_ptr<int32_t>(), ptr.numel() - 1,
                                                         inner.const_data_ptr<int32_t>(), limit),
              message);
}

// The CSR of nnz kept weights in `rows` rows (rows_name: what they are, for messages) and
// `cols` columns (cols_name), on ref's device; checked and contiguous.
struct Csr {
  at::Tensor row_ptr, col;
};

inline Csr check_csr(const at::Tensor& row_ptr, const at::Tensor& col, int64_t nnz, int64_t rows,
                     int64_t cols, const char* rows_name, const char* cols_name, const at::Tensor& ref,
                     const char* ref_name) {
  Csr csr{check_index(row_ptr, "row_ptr", rows + 1, c10::str(rows_name, " + 1"), ref, ref_name),
          check_index(col, "col", nnz, "one per kept weight", ref, ref_name)};
  check_pointers(csr.row_ptr, "row_ptr", nnz);
  check_segments(csr.row_ptr, csr.col, cols,
                 c10::str("col must hold, within each row, strictly increasing columns in [0, ", cols, ") (",
                          cols_name, ")"));
  return csr;
}

// The CSC of nnz kept weights, as check_csr.
struct Csc {
  at::Tensor col_ptr, row, csc_to_csr;
};

inline Csc check_csc(const at::Tensor& col_ptr, const at::Tensor& row, const at::Tensor& csc_to_csr,
                     int64_t nnz, int64_t rows, int64_t cols, const char* rows_name, const char* cols_name,
                     const at::Tensor& ref, const char* ref_name) {
  Csc csc{check_index(col_ptr, "col_ptr", cols + 1, c10::str(cols_name, " + 1"), ref, ref_name),
          check_index(row, "row", nnz, "one per kept weight", ref, ref_name),
          check_index(csc_to_csr, "csc_to_csr", nnz, "one per kept weight", ref, ref_name)};
  check_pointers(csc.col_ptr, "col_ptr", nnz);
  check_segments(csc.col_ptr, csc.row, rows,
                 c10::str("row must hold, within each column, strictly increasing rows in [0, ", rows, ") (",
                          rows_name, ")"));
  check_range(csc.csc_to_csr, nnz, c10::str("csc_to_csr must hold indices in [0, ", nnz, ") (the kept weights)"));
  return csc;
}

// Entries a pass over the indices takes per parallel task: fewer run on the calling thread, as a
// parallel region may wait longer for a busy core than such a pass takes.
constexpr int64_t kSerialEntries = 1 << 18;

// The values in the CSC's order: w[e] = values[csc_to_csr[e]] (one pass of random reads, where
// a kernel would repeat them for every block of the batch).
inline at::Tensor csc_values(const Csc& csc, const at::Tensor& values) {
  const at::Tensor v = values.contiguous();
  at::Tensor w = at::empty_like(v);
  const int32_t* k = csc.csc_to_csr.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "robprune_csc_values", [&] {
    const scalar_t* src = v.const_data_ptr<scalar_t>();
    scalar_t* dst = w.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, v.numel(), kSerialEntries, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) dst[e] = src[k[e]];
    });
  });
  return w;
}

// The entries a kernel walks per output channel: where each channel's entries start, their
// weights and their input offsets.
struct Entries {
  at::Tensor start;  // int32 [channels + 1]
  at::Tensor w;      // [entries], the values' dtype
  at::Tensor off;    // int64 [entries]
};

// The CSR's rows as channels: entry e reads offset f(row of e, col[e]); its weight is
// values[e] (values may be undefined where the kernel needs no weights). like: the options of
// the offsets' device.
template <class F>
Entries csr_entries(const Csr& csr, const at::Tensor& values, const at::Tensor& like, const F& f) {
  const int32_t* ptr = csr.row_ptr.const_data_ptr<int32_t>();
  const int32_t* col = csr.col.const_data_ptr<int32_t>();
  const int64_t rows = csr.row_ptr.numel() - 1;
  at::Tensor off = at::empty({csr.col.numel()}, like.options().dtype(at::kLong));
  int64_t* o = off.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, rows * kSerialEntries / std::max<int64_t>(csr.col.numel(), 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r)
                       for (int32_t e = ptr[r]; e < ptr[r + 1]; ++e) o[e] = f(r, col[e]);
                   });
  return {csr.row_ptr, values.defined() ? values.contiguous() : values, off};
}

}  // namespace robprune
