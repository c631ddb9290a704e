// The interval family's kernels for the CPU: IntervalKernels over for_each_cpu.h's loops.
#include <robprune/for_each_cpu.h>

#include "interval_kernels.h"

namespace robprune {
template struct IntervalKernels<CpuBackend>;
}  // namespace robprune
