// The CROWN family's kernels for CUDA: CrownKernels over for_each_cuda.cuh's loops.
#include <robprune/for_each_cuda.cuh>

#include "crown_kernels.h"

namespace robprune {
template struct CrownKernels<CudaBackend>;
}  // namespace robprune
