// Where the compressed ops' buffers come from.
//
// A fresh allocation of a large buffer costs its page faults on every call: glibc maps every
// block above 32 MiB anew (and gives it back on free), and the first touch of each 4 KiB page
// traps. For a convolution of 128 CIFAR images (32 -> 64 channels) that is ~16 ms per 33 MB on a
// 2-core VM, more than the products themselves take at 95% sparsity. So:
//
// - scratch(): the buffers an op needs only during a call (planes, transposed operands, phase
//   planes) come from numbered slots of a thread-local arena, which keeps the largest buffer each
//   slot ever needed for the life of the thread. Nothing an op returns may be (a view of) a
//   scratch buffer, and one op call must not use a slot twice at once.
// - fresh(): an op's own result, when it is large, is advised to use transparent huge
//   pages before its first touch (512 times fewer faults: ~4.5 ms instead of ~16 ms for 33 MB on
//   the same VM). Advice only: where the kernel has THP off, nothing changes. torch offers the
//   same for every allocation with THP_MEM_ALLOC_ENABLE=1.
//
// - retained planes (sparse_planes.h, RetainedPlanes): the input planes a convolution's forward
//   packs when autograd will ask for the weights' gradient go to a buffer of their own instead
//   of the shared scratch slot, and stay there, keyed by the input, for the backward, which
//   would pack the same input again for that gradient (a ReLU box: read both operands, write
//   both planes; the packs took 11% of a pruned cnn_large's IBP step). The buffers are
//   recycled once their inputs are gone (the next step's forward finds them mapped): about
//   50 MB more peak memory for that step at batch 128.
//
// On a GPU none applies: the caching allocator already recycles blocks without faults, in
// stream order, where a thread's arena would pin device memory for good and hand one buffer to
// ops queued on different streams. There both are plain allocations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <sys/mman.h>

#include <array>
#include <cstdint>

namespace robprune {

enum class Scratch : int { kInput, kInput1, kGradient, kGradient1, kOutput, kOutput1, kCount };

// A 1-D buffer of at least numel elements of options' dtype and device, from the calling
// thread's slot on the CPU (reallocated when too small or of another dtype or device).
inline at::Tensor scratch(Scratch slot, int64_t numel, const at::TensorOptions& options) {
  if (options.device().type() != at::kCPU) return at::empty({numel}, options);
  thread_local std::array<at::Tensor, static_cast<size_t>(Scratch::kCount)> slots;
  at::Tensor& buffer = slots[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype().toScalarType() ||
      buffer.device() != options.device())
    buffer = at::empty({numel}, options);
  return buffer.narrow(0, 0, numel);
}

// An empty tensor of `shape` in `format`; on the CPU from 4 MiB on, advised to use huge pages
// (its 2 MiB aligned interior, before anything touches it).
inline at::Tensor fresh(at::IntArrayRef shape, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  constexpr size_t kLarge = size_t(4) << 20;
  at::Tensor t = at::empty(shape, options.memory_format(format));
#ifdef MADV_HUGEPAGE
  const size_t bytes = t.nbytes();
  if (t.is_cpu() && bytes >= kLarge) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (at + kHuge - 1) & ~(kHuge - 1), end = (at + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace robprune
