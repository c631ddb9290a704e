// CUDA instantiation of the box kernels (box_kernels_impl.h over for_each_cuda.cuh).
#include "box_kernels_impl.h"

#include <robprune/for_each_cuda.cuh>

namespace robprune {
template struct BoxKernels<CudaBackend>;
}  // namespace robprune
