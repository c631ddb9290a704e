// The compressed path's kernels for CUDA: the generic kernels (sparse_generic.h) over
// for_each_cuda.cuh's loops.
#include <robprune/for_each_cuda.cuh>

#include "sparse_generic.h"

namespace robprune {
template struct SparseKernels<CudaBackend>;
ROBPRUNE_SPARSE_KERNELS_FOR(CudaBackend, float)
ROBPRUNE_SPARSE_KERNELS_FOR(CudaBackend, double)
}  // namespace robprune
