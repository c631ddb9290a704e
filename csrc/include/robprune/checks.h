// Argument checks shared by every op. Each message names the argument and what was expected,
// because these errors surface in Python far from the C++ that raised them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace robprune {

// The kernels are written for float32 (speed) and float64 (gradcheck) only.
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// `t` must match `ref` (named `ref_name`) in dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", what, ", got shape ", t.sizes());
}

}  // namespace robprune
