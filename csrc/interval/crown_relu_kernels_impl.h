// Definitions of CrownReluKernels<Backend>: allocate, dispatch on dtype and side, run a
// crown_relu_math.h functor through the backend. Included only by the per-backend units.
#pragma once

#include "crown_relu_kernels.h"
#include "crown_relu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

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

template <class Backend>
std::tuple<at::Tensor, at::Tensor> CrownReluKernels<Backend>::step(const at::Tensor& A,
                                                                   const at::Tensor& lower,
                                                                   const at::Tensor& upper,
                                                                   bool upper_side) {
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = A.size(2);
  at::Tensor out = at::empty({batch, specs, neurons}, A.options());
  at::Tensor bias = at::empty({batch, specs}, A.options());
  const bool broadcast = A.size(0) == 1 && batch != 1;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "robprune_crown_relu_step", [&] {
    auto run = [&](auto f) { Backend::rows_sum(batch * specs, neurons, f, bias.data_ptr<scalar_t>()); };
    const scalar_t *a = A.const_data_ptr<scalar_t>(), *l = lower.const_data_ptr<scalar_t>(),
                   *u = upper.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (upper_side)
      run(crown::ReluStep<scalar_t, true>{a, l, u, o, specs, neurons, broadcast});
    else
      run(crown::ReluStep<scalar_t, false>{a, l, u, o, specs, neurons, broadcast});
  });
  return {out, bias};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> CrownReluKernels<Backend>::step_grad(
    const at::Tensor& grad_out, const at::Tensor& grad_bias, const at::Tensor& A,
    const at::Tensor& lower, const at::Tensor& upper, bool upper_side) {
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = A.size(2);
  at::Tensor grad_A = at::empty({batch, specs, neurons}, A.options());
  at::Tensor grad_lower = at::empty_like(lower), grad_upper = at::empty_like(upper);
  const bool broadcast = A.size(0) == 1 && batch != 1;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "robprune_crown_relu_step_grad", [&] {
    auto run = [&](auto f) { Backend::for_each(batch * neurons, f); };
    const scalar_t *go = grad_out.const_data_ptr<scalar_t>(), *gb = grad_bias.const_data_ptr<scalar_t>(),
                   *a = A.const_data_ptr<scalar_t>(), *l = lower.const_data_ptr<scalar_t>(),
                   *u = upper.const_data_ptr<scalar_t>();
    scalar_t *ga = grad_A.data_ptr<scalar_t>(), *gl = grad_lower.data_ptr<scalar_t>(),
             *gu = grad_upper.data_ptr<scalar_t>();
    if (upper_side)
      run(crown::ReluStepGrad<scalar_t, true>{go, gb, a, l, u, ga, gl, gu, specs, neurons, broadcast});
    else
      run(crown::ReluStepGrad<scalar_t, false>{go, gb, a, l, u, ga, gl, gu, specs, neurons, broadcast});
  });
  return {grad_A, grad_lower, grad_upper};
}

}  // namespace robprune
