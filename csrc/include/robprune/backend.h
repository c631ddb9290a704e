// Picks the kernel backend (CpuBackend or CudaBackend) from a tensor's device, so one op
// implementation serves both devices and only the elementwise kernels differ.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace robprune {

struct CpuBackend;
struct CudaBackend;

template <class Backend>
struct Tag {
  using type = Backend;
};

// Runs fn(Tag<Backend>) with the backend of t's device.
template <class Fn>
decltype(auto) with_backend(const at::Tensor& t, Fn&& fn) {
  if (t.is_cuda()) {
#ifdef ROBPRUNE_WITH_CUDA
    return fn(Tag<CudaBackend>{});
#else
    TORCH_CHECK(false, "robprune_fast was built without its CUDA kernels; rebuild with FORCE_CUDA=1");
#endif
  }
  TORCH_CHECK(t.is_cpu(), "robprune_fast kernels run on CPU and CUDA tensors, got ", t.device());
  return fn(Tag<CpuBackend>{});
}

}  // namespace robprune
