// The CROWN family's kernels for the CPU: CrownKernels over for_each_cpu.h's loops.
#include <robprune/for_each_cpu.h>

#include "crown_kernels.h"

namespace robprune {
template struct CrownKernels<CpuBackend>;
}  // namespace robprune
