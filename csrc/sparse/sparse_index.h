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
// (sparse_kernels.h) of the indices' device, so they vectorise like the rest on the CPU and
// never copy an index to the host from a GPU (each check costs one sync there, for its verdict).
#pragma once

#include "sparse_kernels.h"

#include <robprune/checks.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Exception.h>

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
  const bool ok = with_kernels(ptr, [&](auto k) {
    return decltype(k)::pointers_valid(ptr.const_data_ptr<int32_t>(), ptr.numel() - 1, nnz);
  });
  TORCH_CHECK(ok, name, " must start at 0, never decrease and end at the number of kept weights (", nnz, ")");
}

// Refuses the call with `message` unless every entry of t (int32) lies in [0, limit).
inline void check_range(const at::Tensor& t, int64_t limit, const std::string& message) {
  const bool ok = with_kernels(t, [&](auto k) { return decltype(k)::in_range(t.const_data_ptr<int32_t>(), t.numel(), limit); });
  TORCH_CHECK(ok, message);
}

// Every segment of ptr (a CSR's rows, a CSC's columns; its pointers checked) must hold strictly
// increasing inner indices in [0, limit): the order pack_mask makes, and in range.
inline void check_segments(const at::Tensor& ptr, const at::Tensor& inner, int64_t limit, const std::string& message) {
  const bool ok = with_kernels(ptr, [&](auto k) {
    return decltype(k)::sorted_segments(ptr.const_data_ptr<int32_t>(), ptr.numel() - 1,
                                        inner.const_data_ptr<int32_t>(), inner.numel(), limit);
  });
  TORCH_CHECK(ok, message);
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

// The entries a kernel walks per output channel: where each channel's entries start, their
// weights and their input offsets.
struct Entries {
  at::Tensor start;  // int32 [channels + 1]
  at::Tensor w;      // [entries], the values' dtype
  at::Tensor off;    // int64 [entries]
};

}  // namespace robprune
