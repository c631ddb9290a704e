// The compressed path's kernels for CUDA: the generic kernels (sparse_generic.h) over
// for_each_cuda.cuh's loops.
#include <robprune/for_each_cuda.cuh>

#include "sparse_generic.h"

namespace robprune {
template struct SparseKernels<CudaBackend>;
template void SparseKernels<CudaBackend>::product<float>(const Product<float>&);
template void SparseKernels<CudaBackend>::product<double>(const Product<double>&);
template void SparseKernels<CudaBackend>::dot<float>(const Dot<float>&);
template void SparseKernels<CudaBackend>::dot<double>(const Dot<double>&);
template bool SparseKernels<CudaBackend>::pack<float>(const Pack<float>&);
template bool SparseKernels<CudaBackend>::pack<double>(const Pack<double>&);
template void SparseKernels<CudaBackend>::transposed_entries<float>(const ConvIndex&, const float*, const int32_t*,
                                                                    int64_t, float*, int64_t*);
template void SparseKernels<CudaBackend>::transposed_entries<double>(const ConvIndex&, const double*,
                                                                     const int32_t*, int64_t, double*, int64_t*);
}  // namespace robprune
