// CUDA instantiation of the interval family's kernels (the *_impl.h files over for_each_cuda.cuh).
#include "box_kernels_impl.h"
#include "crown_affine_kernels_impl.h"
#include "crown_relu_kernels_impl.h"

#include <robprune/for_each_cuda.cuh>

namespace robprune {
template struct BoxKernels<CudaBackend>;
template struct CrownReluKernels<CudaBackend>;
template struct CrownAffineKernels<CudaBackend>;
}  // namespace robprune
