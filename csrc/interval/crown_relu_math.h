// Per-element formulas of CROWN's backward step through a ReLU, for CPU and CUDA alike.
//
// A linear bound sum_n A[n] relu(z[n]) is bounded, given pre-activation bounds l <= z <= u,
// by replacing relu with a line: the upper line k z + t (the chord on unstable neurons), the
// lower line lam z (CROWN's adaptive slope: 1 when u >= -l, else 0). A positive coefficient
// takes the line on its own side, a negative one the other side's line. reference.py holds
// the same formulas in plain torch (crown_relu_backward); keep the two in step.
#pragma once

#include "box_math.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace robprune::crown {

template <class T>
struct Relaxation {
  T upper_slope, upper_intercept, lower_slope;
  // Derivatives of the chord's slope k and intercept t; zero off the unstable set, where the
  // lines do not depend on l and u.
  T dk_dl, dk_du, dt_dl, dt_du;
};

template <class T>
C10_HOST_DEVICE inline Relaxation<T> relax(T l, T u) {
  const bool unstable = (l < T(0)) & (u > T(0));
  const bool active = l >= T(0);
  // Off the unstable set the width is replaced by 1, so no inf or NaN is ever formed.
  const T width = box::select(unstable, u - l) + T(!unstable);
  const T inv = T(1) / width;
  const T k = u / width;
  Relaxation<T> r;
  r.upper_slope = box::select(unstable, k) + T(active);
  r.upper_intercept = box::select(unstable, -k * l);
  r.lower_slope = T(unstable & (u >= -l)) + T(active);
  const T inv2 = inv * inv;
  r.dk_dl = box::select(unstable, u * inv2);
  r.dk_du = box::select(unstable, -l * inv2);
  r.dt_dl = box::select(unstable, -u * u * inv2);
  r.dt_du = box::select(unstable, l * l * inv2);
  return r;
}

// Shapes: A (Ba, S, N) with Ba = 1 (shared by the whole batch) or B; lower, upper (B, N);
// out (B, S, N). Row = b * S + s. UPPER: the walk bounds from above.
template <class T, bool UPPER>
struct ReluStep {
  const T* A;
  const T* lower;
  const T* upper;
  T* out;
  int64_t specs, neurons;
  bool broadcast;

  // Writes out[row, n] and returns the row's bias contribution from neuron n.
  C10_HOST_DEVICE T operator()(int64_t row, int64_t n) const {
    const int64_t b = row / specs, s = row - b * specs;
    const T a = A[((broadcast ? 0 : b) * specs + s) * neurons + n];
    const Relaxation<T> r = relax(lower[b * neurons + n], upper[b * neurons + n]);
    const T pos = box::relu(a), neg = a - pos;
    out[row * neurons + n] = UPPER ? pos * r.upper_slope + neg * r.lower_slope
                                   : pos * r.lower_slope + neg * r.upper_slope;
    return (UPPER ? pos : neg) * r.upper_intercept;
  }
};

// Gradient of ReluStep for element i = b * N + n: loops over the S rows, writes grad_A for
// each (b, s, n) (summed over b afterwards when A was shared) and grad_lower/upper[i].
// At a == 0 neither side counts: the gradient there is 0, as torch's clamp_min / clamp_max give.
template <class T, bool UPPER>
struct ReluStepGrad {
  const T* grad_out;
  const T* grad_bias;
  const T* A;
  const T* lower;
  const T* upper;
  T* grad_A;
  T* grad_lower;
  T* grad_upper;
  int64_t specs, neurons;
  bool broadcast;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t b = i / neurons, n = i - b * neurons;
    const Relaxation<T> r = relax(lower[i], upper[i]);
    const T pos_slope = UPPER ? r.upper_slope : r.lower_slope;
    const T neg_slope = UPPER ? r.lower_slope : r.upper_slope;
    T g_l = 0, g_u = 0;
    for (int64_t s = 0; s < specs; ++s) {
      const int64_t row = b * specs + s;
      const T a = A[((broadcast ? 0 : b) * specs + s) * neurons + n];
      const T g = grad_out[row * neurons + n], g_b = grad_bias[row];
      const bool on_pos = a > T(0), on_neg = a < T(0);
      grad_A[row * neurons + n] = g * (T(on_pos) * pos_slope + T(on_neg) * neg_slope) +
                                  g_b * r.upper_intercept * T(UPPER ? on_pos : on_neg);
      const T pos = box::relu(a);
      const T chord_coef = UPPER ? pos : a - pos;  // the coefficient multiplying the chord
      g_l += chord_coef * (g * r.dk_dl + g_b * r.dt_dl);
      g_u += chord_coef * (g * r.dk_du + g_b * r.dt_du);
    }
    grad_lower[i] = g_l;
    grad_upper[i] = g_u;
  }
};

// Validation: lower <= upper everywhere (NaN fails).
template <class T>
struct OrderedBounds {
  const T* lower;
  const T* upper;
  C10_HOST_DEVICE bool operator()(int64_t i) const { return !(lower[i] <= upper[i]); }
};

}  // namespace robprune::crown
