// The elementwise steps around an interval layer's two products, one static function each.
// Declared here for any backend, defined once in box_kernels_impl.h, instantiated for the CPU
// in box_kernels_cpu.cpp and for CUDA in box_kernels_cuda.cu.
//
// Every tensor argument must be dense and laid out like the first tensor argument (same sizes,
// same memory format); callers arrange that with .contiguous(memory_format).
#pragma once

#include <robprune/backend.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace robprune {

template <class Backend>
struct BoxKernels {
  // With check, checks radius >= 0 everywhere (throws otherwise), in the same pass as the
  // ReLU. With relu, returns the box mapped through ReLU, written over c and r when in_place
  // (each element is read before it is written); without relu, returns (c, r) themselves,
  // and without check as well, touches nothing.
  static std::tuple<at::Tensor, at::Tensor> prologue(const at::Tensor& c, const at::Tensor& r,
                                                     bool relu, bool in_place, bool check);
  static std::tuple<at::Tensor, at::Tensor> prologue_backward(const at::Tensor& g_c_out,
                                                              const at::Tensor& g_r_out,
                                                              const at::Tensor& c,
                                                              const at::Tensor& r);
  // (centre, radius) of the eps-ball around x (N, C, *plane) clipped to [0, 1], mapped
  // through h = x * scale + shift (scale, shift: (C,)); x dense and contiguous, eps one
  // element or dense like x. Throws on x outside [0, 1] or eps < 0 (NaN included).
  static std::tuple<at::Tensor, at::Tensor> input_box(const at::Tensor& x, const at::Tensor& eps,
                                                      const at::Tensor& scale,
                                                      const at::Tensor& shift);
  // (centre, radius) -> (lower, upper), in place.
  static void to_bounds_(const at::Tensor& a, const at::Tensor& b);
  static std::tuple<at::Tensor, at::Tensor> to_bounds_backward(const at::Tensor& g_lower,
                                                               const at::Tensor& g_upper);
  // A (2, *w.shape) tensor holding w * mask and |w * mask| (w and |w| without a mask), each
  // half laid out like w.
  static at::Tensor weight_pair(const at::Tensor& w, const c10::optional<at::Tensor>& mask);
  // (grad weight, grad mask) from the gradients with respect to w * mask (g_c) and |w * mask|
  // (g_r, undefined for layers that use w * mask alone); an output not wanted is returned
  // undefined.
  static std::tuple<at::Tensor, at::Tensor> weight_grad(const at::Tensor& g_c,
                                                        const at::Tensor& g_r,
                                                        const at::Tensor& w,
                                                        const c10::optional<at::Tensor>& mask,
                                                        bool need_weight, bool need_mask);
};

}  // namespace robprune
