// CPU instantiation of the interval family's kernels (the *_impl.h files over for_each_cpu.h).
#include "box_kernels_impl.h"
#include "crown_affine_kernels_impl.h"
#include "crown_relu_kernels_impl.h"

#include <robprune/for_each_cpu.h>

namespace robprune {
template struct BoxKernels<CpuBackend>;
template struct CrownReluKernels<CpuBackend>;
template struct CrownAffineKernels<CpuBackend>;
}  // namespace robprune
