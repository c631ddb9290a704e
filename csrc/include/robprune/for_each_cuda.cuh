// The CUDA backend of every elementwise kernel: a grid-stride loop over a C10_HOST_DEVICE
// functor, the twin of for_each_cpu.h with the same static functions.
#pragma once

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers
// that a bare CUDA toolkit (as on CI) does not ship.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace robprune {

template <class F>
__global__ void for_each_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    f(i);
}

template <class F>
__global__ void for_each_any_kernel(int64_t n, F f, int* any) {
  bool local = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    local |= f(i);
  if (local) *any = 1;  // a benign race: every writer stores the same value
}

// A thread per (o, i) pair, walking m in order (the contract of CpuBackend::for_each_nested).
template <class F>
__global__ void for_each_nested_kernel(int64_t outer, int64_t middle, int64_t inner, F f) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < outer * inner;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t o = t / inner, i = t - o * inner;
    for (int64_t m = 0; m < middle; ++m) f(o, m, i);
  }
}

template <class F>
__global__ void for_each_nested_any_kernel(int64_t outer, int64_t middle, int64_t inner, F f, int* any) {
  bool local = false;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < outer * inner;
       t += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t o = t / inner, i = t - o * inner;
    for (int64_t m = 0; m < middle; ++m) local |= f(o, m, i);
  }
  if (local) *any = 1;  // a benign race, as in for_each_any_kernel
}

// One block per row: threads stride over the row's elements, then reduce in shared memory.
template <class F, class T, int THREADS>
__global__ void rows_sum_kernel(int64_t cols, F f, T* sums) {
  __shared__ T partial[THREADS];
  const int64_t row = blockIdx.x;
  const auto h = f.row(row);
  T acc = 0;
  for (int64_t j = threadIdx.x; j < cols; j += THREADS) acc += h(j);
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = THREADS / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[row] = partial[0];
}

struct CudaBackend {
  static constexpr int kThreads = 256;

  // Enough blocks to fill every SM a few times over; the grid-stride loop covers the rest.
  static int blocks_for(int64_t n) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    const int64_t cap = static_cast<int64_t>(sms) * 32;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, cap)));
  }

  template <class F>
  static void for_each(int64_t n, const F& f) {
    if (n == 0) return;
    for_each_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Returns whether f(i) was true for any i. Costs one device-to-host sync: the price of
  // refusing bad input on the GPU with a Python error instead of a device-side assert.
  template <class F>
  static bool for_each_any(int64_t n, const F& f, const at::Tensor& like) {
    if (n == 0) return false;
    at::Tensor flag = at::zeros({1}, like.options().dtype(at::kInt));
    for_each_any_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        n, f, flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return flag.item<int>() != 0;
  }

  // Twin of CpuBackend::for_each_nested.
  template <class F>
  static void for_each_nested(int64_t outer, int64_t middle, int64_t inner, const F& f) {
    const int64_t n = outer * inner;
    if (n == 0) return;
    for_each_nested_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        outer, middle, inner, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Twin of CpuBackend::for_each_nested_any; one device-to-host sync, as for_each_any.
  template <class F>
  static bool for_each_nested_any(int64_t outer, int64_t middle, int64_t inner, const F& f,
                                  const at::Tensor& like) {
    const int64_t n = outer * inner;
    if (n == 0) return false;
    at::Tensor flag = at::zeros({1}, like.options().dtype(at::kInt));
    for_each_nested_any_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        outer, middle, inner, f, flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return flag.item<int>() != 0;
  }

  // Twin of CpuBackend::rows_sum.
  template <class F, class T>
  static void rows_sum(int64_t rows, int64_t cols, const F& f, T* sums) {
    if (rows == 0) return;
    rows_sum_kernel<F, T, kThreads><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(cols, f, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace robprune
