// Definitions of CrownReluKernels<Backend>: allocate, dispatch on dtype and side, run the
// crown_relu_math.h functors through the backend (the side's lines once per neuron, then the
// pass over A). Included only by the per-backend units.
#pragma once

#include "crown_relu_kernels.h"
#include "crown_relu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <type_traits>

namespace robprune {

template <class Backend>
bool CrownReluKernels<Backend>::ordered(const at::Tensor& lower, const at::Tensor& upper) {
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "robprune_crown_relu_ordered", [&] {
    crown::OrderedBounds<scalar_t> f{lower.const_data_ptr<scalar_t>(), upper.const_data_ptr<scalar_t>()};
    bad = Backend::for_each_any(lower.numel(), f, lower);
  });
  return !bad;
}

namespace crown_detail {

// From this many rows up, the side's lines are made once per neuron and shared by the rows.
constexpr int64_t kSharedLinesFromSpecs = 3;

// Runs fn(T{}, side, shared) with the dtype, the side (std::bool_constant<upper_side>) and
// whether the rows share precomputed lines (std::bool_constant) resolved at compile time.
template <class Fn>
void dispatch(const at::Tensor& t, bool upper_side, bool shared, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "robprune_crown_relu", [&] {
    auto with_shared = [&](auto side) {
      if (shared)
        fn(scalar_t(0), side, std::true_type{});
      else
        fn(scalar_t(0), side, std::false_type{});
    };
    if (upper_side)
      with_shared(std::true_type{});
    else
      with_shared(std::false_type{});
  });
}

// Where the passes over A find the lines: a (3, B * N) buffer filled here (SHARED), or the
// bounds themselves. `buffer` keeps the lines alive while they are read.
template <class Backend, class T, bool UPPER, bool SHARED>
crown::LinesAt<T, UPPER, SHARED> lines_at(const at::Tensor& lower, const at::Tensor& upper,
                                          at::Tensor& buffer) {
  const int64_t n = lower.numel();
  if (!SHARED) return {lower.const_data_ptr<T>(), upper.const_data_ptr<T>(), n};
  buffer = at::empty({3, n}, lower.options());
  Backend::for_each(n, crown::SideLines<T, UPPER>{lower.const_data_ptr<T>(), upper.const_data_ptr<T>(),
                                                  buffer.data_ptr<T>(), n});
  return {buffer.const_data_ptr<T>(), nullptr, n};
}

}  // namespace crown_detail

template <class Backend>
std::tuple<at::Tensor, at::Tensor> CrownReluKernels<Backend>::step(const at::Tensor& A,
                                                                   const at::Tensor& lower,
                                                                   const at::Tensor& upper,
                                                                   bool upper_side) {
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = A.size(2);
  at::Tensor out = at::empty({batch, specs, neurons}, A.options());
  at::Tensor bias = at::empty({batch, specs}, A.options());
  const bool broadcast = A.size(0) == 1 && batch != 1;
  const bool shared = specs >= crown_detail::kSharedLinesFromSpecs;
  crown_detail::dispatch(A, upper_side, shared, [&](auto tag, auto side, auto share) {
    using T = decltype(tag);
    constexpr bool UPPER = decltype(side)::value, SHARED = decltype(share)::value;
    at::Tensor buffer;
    const auto lines = crown_detail::lines_at<Backend, T, UPPER, SHARED>(lower, upper, buffer);
    Backend::rows_sum(batch * specs, neurons,
                      crown::ReluStep<T, UPPER, SHARED>{A.const_data_ptr<T>(), lines, out.data_ptr<T>(),
                                                        specs, neurons, broadcast},
                      bias.data_ptr<T>());
  });
  return {out, bias};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> CrownReluKernels<Backend>::step_grad(
    const at::Tensor& grad_out, const at::Tensor& grad_bias, const at::Tensor& A,
    const at::Tensor& lower, const at::Tensor& upper, bool upper_side) {
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = A.size(2);
  at::Tensor grad_A = at::empty({batch, specs, neurons}, A.options());
  // The row sums ReluStepGrad accumulates first, the bounds' gradients after ChordGrad. With no
  // rows there is nothing to sum: the gradients are 0.
  at::Tensor grad_lower = specs ? at::empty_like(lower) : at::zeros_like(lower);
  at::Tensor grad_upper = specs ? at::empty_like(upper) : at::zeros_like(upper);
  if (specs == 0) return {grad_A, grad_lower, grad_upper};
  const bool broadcast = A.size(0) == 1 && batch != 1;
  const bool shared = specs >= crown_detail::kSharedLinesFromSpecs;
  crown_detail::dispatch(A, upper_side, shared, [&](auto tag, auto side, auto share) {
    using T = decltype(tag);
    constexpr bool UPPER = decltype(side)::value, SHARED = decltype(share)::value;
    at::Tensor buffer;
    const auto lines = crown_detail::lines_at<Backend, T, UPPER, SHARED>(lower, upper, buffer);
    T *gl = grad_lower.data_ptr<T>(), *gu = grad_upper.data_ptr<T>();
    Backend::for_each_nested(
        batch, specs, neurons,
        crown::ReluStepGrad<T, UPPER, SHARED>{grad_out.const_data_ptr<T>(), grad_bias.const_data_ptr<T>(),
                                              A.const_data_ptr<T>(), lines, grad_A.data_ptr<T>(), gl, gu,
                                              specs, neurons, broadcast});
    Backend::for_each(lower.numel(), crown::ChordGrad<T>{lower.const_data_ptr<T>(), upper.const_data_ptr<T>(), gl, gu});
  });
  return {grad_A, grad_lower, grad_upper};
}

}  // namespace robprune
