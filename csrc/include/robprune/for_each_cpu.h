// The CPU backend of every elementwise kernel: apply a functor to indices [0, n) in parallel.
// Kernels are written once as C10_HOST_DEVICE functors; this file and for_each_cuda.cuh only
// decide how the indices are spread over threads, behind the same static functions.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace robprune {

struct CpuBackend {
  // Large enough that a thread's chunk amortises the scheduling cost of at::parallel_for.
  static constexpr int64_t kGrain = 32768;

  template <class F>
  static void for_each(int64_t n, const F& f) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      // A local copy: stores through the functor's pointers could otherwise alias the functor
      // itself, forcing a reload of every pointer per element. omp simd: elements are
      // independent, so the compiler may vectorise across them.
      const F g = f;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) g(i);
    });
  }

  // For functors that return true when element i is invalid: returns whether any element was.
  // Validation rides along with a pass that reads the data anyway. `like` is unused on the CPU.
  template <class F>
  static bool for_each_any(int64_t n, const F& f, const at::Tensor& /*like*/) {
    std::atomic<bool> any{false};
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      const F g = f;  // see for_each
      int local = 0;
#pragma omp simd reduction(| : local)
      for (int64_t i = begin; i < end; ++i) local |= static_cast<int>(g(i));
      if (local) any.store(true, std::memory_order_relaxed);
    });
    return any.load();
  }

  // For nested functors: f(o, m, i) for o < outer, m < middle, i < inner. One thread handles
  // every (m, i) of a given o, walking m in order, so f may accumulate into an [o, i] slot
  // across m without a race. Outer indices are spread over threads, inner ones vectorised.
  template <class F>
  static void for_each_nested(int64_t outer, int64_t middle, int64_t inner, const F& f) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(middle * inner, 1));
    at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
      const F g = f;  // see for_each
      for (int64_t o = begin; o < end; ++o)
        for (int64_t m = 0; m < middle; ++m) {
#pragma omp simd
          for (int64_t i = 0; i < inner; ++i) g(o, m, i);
        }
    });
  }

  // for_each_nested for functors that return true on invalid input: whether any did.
  template <class F>
  static bool for_each_nested_any(int64_t outer, int64_t middle, int64_t inner, const F& f,
                                  const at::Tensor& /*like*/) {
    std::atomic<bool> any{false};
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(middle * inner, 1));
    at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
      const F g = f;  // see for_each
      int local = 0;
      for (int64_t o = begin; o < end; ++o)
        for (int64_t m = 0; m < middle; ++m) {
#pragma omp simd reduction(| : local)
          for (int64_t i = 0; i < inner; ++i) local |= static_cast<int>(g(o, m, i));
        }
      if (local) any.store(true, std::memory_order_relaxed);
    });
    return any.load();
  }

  // For row functors: f.row(row) binds f to one row (its per-row index arithmetic, divisions
  // included, done once: with a division per element GCC leaves the loop scalar), and the
  // bound h(j) handles element j of that row and returns its contribution to the row's sum,
  // which lands in sums[row]. Rows are spread over threads, elements vectorised.
  template <class F, class T>
  static void rows_sum(int64_t rows, int64_t cols, const F& f, T* sums) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      const F g = f;  // see for_each
      for (int64_t row = begin; row < end; ++row) {
        const auto h = g.row(row);
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < cols; ++j) acc += h(j);
        sums[row] = acc;
      }
    });
  }
};

}  // namespace robprune
