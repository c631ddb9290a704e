// CPU instantiation of the box kernels (box_kernels_impl.h over for_each_cpu.h).
#include "box_kernels_impl.h"

#include <robprune/for_each_cpu.h>

namespace robprune {
template struct BoxKernels<CpuBackend>;
}  // namespace robprune
