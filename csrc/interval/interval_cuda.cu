// The interval family's kernels for CUDA: IntervalKernels over for_each_cuda.cuh's loops.
#include <robprune/for_each_cuda.cuh>

#include "interval_kernels.h"

namespace robprune {
template struct IntervalKernels<CudaBackend>;
}  // namespace robprune
