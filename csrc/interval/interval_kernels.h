// The interval family's elementwise kernels: the steps around an interval layer's two
// products, one static function each, which allocate the outputs, dispatch on the dtype and
// run an interval_math.h functor through the Backend's loops (for_each_cpu.h,
// for_each_cuda.cuh). Written once for both backends here and instantiated once per backend,
// in interval_cpu.cpp and interval_cuda.cu.
//
// Every tensor argument must be dense and laid out like the first tensor argument (same sizes,
// same memory format); callers arrange that with .contiguous(memory_format).
#pragma once

#include "interval_math.h"

#include <robprune/backend.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Optional.h>
#include <c10/util/accumulate.h>

#include <tuple>
#include <type_traits>
#include <vector>

namespace robprune {

template <class Backend>
struct IntervalKernels {
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

template <class Backend>
std::tuple<at::Tensor, at::Tensor> IntervalKernels<Backend>::prologue(const at::Tensor& c,
                                                                      const at::Tensor& r,
                                                                      bool relu, bool in_place,
                                                                      bool check) {
  if (!relu && !check) return {c, r};
  at::Tensor c_out = relu && !in_place ? at::empty_like(c) : c;
  at::Tensor r_out = relu && !in_place ? at::empty_like(r) : r;
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "robprune_interval_prologue", [&] {
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    // Without check, for_each ignores the functor's verdict: no reduction, and on the GPU no
    // device-to-host sync.
    auto run = [&](const auto& f) {
      if (check) bad = Backend::for_each_any(c.numel(), f, c);
      else Backend::for_each(c.numel(), f);
    };
    if (relu)
      run(interval::Prologue<scalar_t, true>{cp, rp, c_out.data_ptr<scalar_t>(), r_out.data_ptr<scalar_t>()});
    else
      run(interval::Prologue<scalar_t, false>{cp, rp, nullptr, nullptr});
  });
  TORCH_CHECK(!bad, "radius must be >= 0 everywhere (no negative or NaN entries); "
              "build a box from bounds with robprune_fast.ops.box_from_bounds(lower, upper)");
  return {c_out, r_out};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> IntervalKernels<Backend>::prologue_backward(
    const at::Tensor& g_c_out, const at::Tensor& g_r_out, const at::Tensor& c, const at::Tensor& r) {
  at::Tensor g_c = at::empty_like(c), g_r = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "robprune_interval_prologue_backward", [&] {
    interval::PrologueBackward<scalar_t> f{g_c_out.const_data_ptr<scalar_t>(),
                                           g_r_out.const_data_ptr<scalar_t>(),
                                           c.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                                           g_c.data_ptr<scalar_t>(), g_r.data_ptr<scalar_t>()};
    Backend::for_each(c.numel(), f);
  });
  return {g_c, g_r};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> IntervalKernels<Backend>::input_box(const at::Tensor& x,
                                                                       const at::Tensor& eps,
                                                                       const at::Tensor& scale,
                                                                       const at::Tensor& shift) {
  at::Tensor c = at::empty_like(x), r = at::empty_like(x);
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t plane = c10::multiply_integers(x.sizes().slice(2));
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "robprune_interval_input_box", [&] {
    auto run = [&](auto scalar_eps) {
      interval::InputBox<scalar_t, decltype(scalar_eps)::value> f{
          x.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          shift.const_data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), channels, plane};
      bad = Backend::for_each_nested_any(batch, channels, plane, f, x);
    };
    eps.numel() == 1 ? run(std::true_type{}) : run(std::false_type{});
  });
  TORCH_CHECK(!bad, "x must lie in [0, 1] and eps must be >= 0 everywhere (no NaN)");
  return {c, r};
}

template <class Backend>
void IntervalKernels<Backend>::to_bounds_(const at::Tensor& a, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "robprune_interval_to_bounds", [&] {
    interval::ToBounds<scalar_t> f{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>()};
    Backend::for_each(a.numel(), f);
  });
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> IntervalKernels<Backend>::to_bounds_backward(
    const at::Tensor& g_lower, const at::Tensor& g_upper) {
  at::Tensor g_c = at::empty_like(g_lower), g_r = at::empty_like(g_lower);
  AT_DISPATCH_FLOATING_TYPES(g_lower.scalar_type(), "robprune_interval_to_bounds_backward", [&] {
    interval::ToBoundsBackward<scalar_t> f{g_lower.const_data_ptr<scalar_t>(),
                                           g_upper.const_data_ptr<scalar_t>(),
                                           g_c.data_ptr<scalar_t>(), g_r.data_ptr<scalar_t>()};
    Backend::for_each(g_lower.numel(), f);
  });
  return {g_c, g_r};
}

template <class Backend>
at::Tensor IntervalKernels<Backend>::weight_pair(const at::Tensor& w,
                                                 const c10::optional<at::Tensor>& mask) {
  // Each half laid out like w (w is dense), so a channels_last weight gives channels_last halves.
  std::vector<int64_t> shape{2}, strides{w.numel()};
  shape.insert(shape.end(), w.sizes().begin(), w.sizes().end());
  strides.insert(strides.end(), w.strides().begin(), w.strides().end());
  at::Tensor pair = at::empty_strided(shape, strides, w.options());
  const int64_t n = w.numel();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "robprune_interval_weight_pair", [&] {
    scalar_t* out = pair.data_ptr<scalar_t>();
    if (mask) {
      interval::WeightPair<scalar_t, true> f{w.const_data_ptr<scalar_t>(),
                                             mask->const_data_ptr<scalar_t>(), out, out + n};
      Backend::for_each(n, f);
    } else {
      interval::WeightPair<scalar_t, false> f{w.const_data_ptr<scalar_t>(), nullptr, out, out + n};
      Backend::for_each(n, f);
    }
  });
  return pair;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> IntervalKernels<Backend>::weight_grad(
    const at::Tensor& g_c, const at::Tensor& g_r, const at::Tensor& w,
    const c10::optional<at::Tensor>& mask, bool need_weight, bool need_mask) {
  at::Tensor g_w = need_weight ? at::empty_like(w) : at::Tensor();
  at::Tensor g_m = (need_mask && mask) ? at::empty_like(w) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "robprune_interval_weight_grad", [&] {
    auto run = [&](auto masked, auto abs) {
      interval::WeightGrad<scalar_t, decltype(masked)::value, decltype(abs)::value> f{
          g_c.const_data_ptr<scalar_t>(), abs ? g_r.const_data_ptr<scalar_t>() : nullptr,
          w.const_data_ptr<scalar_t>(), masked ? mask->const_data_ptr<scalar_t>() : nullptr,
          need_weight ? g_w.data_ptr<scalar_t>() : nullptr,
          g_m.defined() ? g_m.data_ptr<scalar_t>() : nullptr};
      Backend::for_each(w.numel(), f);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (mask) {
      g_r.defined() ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      g_r.defined() ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });
  return {g_w, g_m};
}

// Each backend's instantiation lives in its own translation unit (interval_cpu.cpp,
// interval_cuda.cu), the only ones that see the backend's loops; these declarations keep every
// other includer from instantiating the definitions above.
extern template struct IntervalKernels<CpuBackend>;
extern template struct IntervalKernels<CudaBackend>;

}  // namespace robprune
