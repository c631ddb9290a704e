// The CROWN family's elementwise kernels, one static function per pass: through a ReLU (the
// side's lines once per neuron, then the pass over A) and the bias term of an affine layer.
// Each allocates its outputs, dispatches on the dtype and side, and runs crown_math.h's
// functors through the Backend's loops (for_each_cpu.h, for_each_cuda.cuh). Written once for
// both backends here and instantiated once per backend, in crown_cpu.cpp and crown_cuda.cu.
#pragma once

#include "crown_math.h"

#include <robprune/backend.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/accumulate.h>

#include <tuple>
#include <type_traits>

namespace robprune {

template <class Backend>
struct CrownKernels {
  // Through a ReLU. Arguments are dense and contiguous, already flattened: A (Ba, S, N) with
  // Ba in {1, B}, lower and upper (B, N).
  // Whether lower <= upper holds everywhere (false on any NaN).
  static bool ordered(const at::Tensor& lower, const at::Tensor& upper);
  // (A' of shape (B, S, N), bias of shape (B, S)).
  static std::tuple<at::Tensor, at::Tensor> relu_step(const at::Tensor& A, const at::Tensor& lower,
                                                      const at::Tensor& upper, bool upper_side);
  // (grad A of shape (B, S, N) before any sum over a shared A, grad lower, grad upper).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_step_grad(
      const at::Tensor& grad_out, const at::Tensor& grad_bias, const at::Tensor& A,
      const at::Tensor& lower, const at::Tensor& upper, bool upper_side);

  // Through an affine layer. A (rows, channels) or (rows, channels, H, W), dense (contiguous
  // or channels_last), bias (channels,): the (rows,) sums sum_{c, y, x} A[row, c, y, x] *
  // bias[c], in one pass over A.
  static at::Tensor bias_term(const at::Tensor& A, const at::Tensor& bias);
};

template <class Backend>
bool CrownKernels<Backend>::ordered(const at::Tensor& lower, const at::Tensor& upper) {
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

// Runs fn(T{}, side, shared, lines) for a pass over A (Ba, S, N): dispatch's arguments, the rows
// sharing lines from kSharedLinesFromSpecs rows up, and the lines the pass reads (lines_at).
template <class Backend, class Fn>
void with_lines(const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper, bool upper_side, Fn&& fn) {
  dispatch(A, upper_side, A.size(1) >= kSharedLinesFromSpecs, [&](auto tag, auto side, auto share) {
    at::Tensor buffer;
    fn(tag, side, share,
       lines_at<Backend, decltype(tag), decltype(side)::value, decltype(share)::value>(lower, upper, buffer));
  });
}

}  // namespace crown_detail

template <class Backend>
std::tuple<at::Tensor, at::Tensor> CrownKernels<Backend>::relu_step(const at::Tensor& A,
                                                                    const at::Tensor& lower,
                                                                    const at::Tensor& upper,
                                                                    bool upper_side) {
  const int64_t batch = lower.size(0), specs = A.size(1), neurons = A.size(2);
  at::Tensor out = at::empty({batch, specs, neurons}, A.options());
  at::Tensor bias = at::empty({batch, specs}, A.options());
  const bool broadcast = A.size(0) == 1 && batch != 1;
  crown_detail::with_lines<Backend>(A, lower, upper, upper_side,
                                    [&](auto tag, auto side, auto share, const auto& lines) {
    using T = decltype(tag);
    constexpr bool UPPER = decltype(side)::value, SHARED = decltype(share)::value;
    Backend::rows_sum(batch * specs, neurons,
                      crown::ReluStep<T, UPPER, SHARED>{A.const_data_ptr<T>(), lines, out.data_ptr<T>(),
                                                        specs, neurons, broadcast},
                      bias.data_ptr<T>());
  });
  return {out, bias};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> CrownKernels<Backend>::relu_step_grad(
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
  crown_detail::with_lines<Backend>(A, lower, upper, upper_side,
                                    [&](auto tag, auto side, auto share, const auto& lines) {
    using T = decltype(tag);
    constexpr bool UPPER = decltype(side)::value, SHARED = decltype(share)::value;
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

template <class Backend>
at::Tensor CrownKernels<Backend>::bias_term(const at::Tensor& A, const at::Tensor& bias) {
  // Rows of the flat buffer along which the channel is fixed (NCHW: one (row, channel) plane)
  // or along which it runs (channels_last, and linear layers: one pixel's channels). The plane
  // is the product of the spatial sizes (1 for linear layers), never numel / (rows * channels),
  // which has no answer when either is 0.
  const int64_t rows = A.size(0), channels = A.size(1);
  const int64_t plane = c10::multiply_integers(A.sizes().slice(2));
  const bool per_row_channel = A.dim() == 4 && A.is_contiguous() && plane > 1;
  const int64_t sums_per_row = per_row_channel ? channels : plane;
  const int64_t flat_rows = rows * sums_per_row;
  at::Tensor sums = at::empty({flat_rows}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "robprune_crown_bias_term", [&] {
    const scalar_t *a = A.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    scalar_t* out = sums.data_ptr<scalar_t>();
    if (per_row_channel)
      Backend::rows_sum(flat_rows, plane, crown::BiasDot<scalar_t, true>{a, b, plane, channels}, out);
    else
      Backend::rows_sum(flat_rows, channels, crown::BiasDot<scalar_t, false>{a, b, channels, channels}, out);
  });
  // The partial sums (per (row, channel) or per pixel) are a small fraction of A: summing them
  // per row is cheap beside the pass over A.
  return sums_per_row != 1 ? sums.view({rows, sums_per_row}).sum(1) : sums;
}

// Each backend's instantiation lives in its own translation unit (crown_cpu.cpp,
// crown_cuda.cu), the only ones that see the backend's loops; these declarations keep every
// other includer from instantiating the definitions above.
extern template struct CrownKernels<CpuBackend>;
extern template struct CrownKernels<CudaBackend>;

}  // namespace robprune
