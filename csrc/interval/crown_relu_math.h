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
  // select(), never T(bool): GCC does not vectorise bool-to-float conversions.
  const bool unstable = (l < T(0)) & (u > T(0));
  const bool active = l >= T(0);
  // Off the unstable set the width is replaced by 1, so no inf or NaN is ever formed.
  const T width = box::select(unstable, u - l) + box::select(!unstable, T(1));
  const T inv = T(1) / width;
  const T k = u / width;
  Relaxation<T> r;
  r.upper_slope = box::select(unstable, k) + box::select(active, T(1));
  r.upper_intercept = box::select(unstable, -k * l);
  r.lower_slope = box::select(unstable & (u >= -l), T(1)) + box::select(active, T(1));
  const T inv2 = inv * inv;
  r.dk_dl = box::select(unstable, u * inv2);
  r.dk_du = box::select(unstable, -l * inv2);
  r.dt_dl = box::select(unstable, -u * u * inv2);
  r.dt_du = box::select(unstable, l * l * inv2);
  return r;
}

// The lines one side of the walk takes at a neuron: the slope a positive coefficient takes,
// the slope a negative one takes, and the chord's intercept (which the coefficient on the
// chord's side pays).
template <class T>
struct Lines {
  T pos_slope, neg_slope, intercept;
};

template <class T, bool UPPER>
C10_HOST_DEVICE inline Lines<T> side_lines(T l, T u) {
  const Relaxation<T> r = relax(l, u);
  return {UPPER ? r.upper_slope : r.lower_slope, UPPER ? r.lower_slope : r.upper_slope,
          r.upper_intercept};
}

// Where a pass over A finds neuron i's lines. SHARED: precomputed once per neuron (SideLines)
// and read by all S rows, so relax()'s divisions are not repeated per row; pays off from a few
// rows up. Otherwise made on the spot from the bounds (one row: no extra pass over the neurons).
template <class T, bool UPPER, bool SHARED>
struct LinesAt {
  const T* a;  // SHARED: positive slopes (then negative slopes, intercepts, n apart); else lower
  const T* b;  // SHARED: unused; else upper
  int64_t n;
  C10_HOST_DEVICE Lines<T> operator()(int64_t i) const {
    if (SHARED) return {a[i], a[n + i], a[2 * n + i]};
    return side_lines<T, UPPER>(a[i], b[i]);
  }
};

// Fills the (3, n) buffer LinesAt<T, UPPER, true> reads.
template <class T, bool UPPER>
struct SideLines {
  const T* lower;
  const T* upper;
  T* lines;
  int64_t n;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const Lines<T> l = side_lines<T, UPPER>(lower[i], upper[i]);
    lines[i] = l.pos_slope;
    lines[n + i] = l.neg_slope;
    lines[2 * n + i] = l.intercept;
  }
};

// Shapes: A (Ba, S, N) with Ba = 1 (shared by the whole batch) or B; bounds (B, N); out
// (B, S, N). Row = b * S + s. UPPER: the walk bounds from above. A row functor for
// Backend::rows_sum: the row's sum is its bias contribution.
template <class T, bool UPPER, bool SHARED>
struct ReluStep {
  const T* A;
  LinesAt<T, UPPER, SHARED> lines;
  T* out;
  int64_t specs, neurons;
  bool broadcast;

  struct Row {
    const T* a;                       // the row of A
    LinesAt<T, UPPER, SHARED> lines;
    int64_t first;                    // b * N: the row's input's first neuron in the bounds
    T* out;                           // the row of out
    // Writes out[row, n] and returns the row's bias contribution from neuron n.
    C10_HOST_DEVICE T operator()(int64_t n) const {
      const T an = a[n];
      const Lines<T> l = lines(first + n);
      const T pos = box::relu(an), neg = an - pos;
      out[n] = pos * l.pos_slope + neg * l.neg_slope;
      return (UPPER ? pos : neg) * l.intercept;
    }
  };
  C10_HOST_DEVICE Row row(int64_t r) const {
    const int64_t b = r / specs, s = r - b * specs;
    return {A + ((broadcast ? 0 : b) * specs + s) * neurons, lines, b * neurons, out + r * neurons};
  }
};

// Gradient of ReluStep at (b, s, n), run by Backend::for_each_nested (one thread walks the S
// rows of a given (b, n) in order): writes grad_A[b, s, n] (summed over b afterwards when A
// was shared) and accumulates, per neuron, the sums over s of chord * g and chord * g_bias
// into chord_g and chord_gb (the row s = 0 starts them, so they need no zeroing); ChordGrad
// turns them into the gradients of the bounds. At a == 0 neither side counts: the gradient
// there is 0, as torch's clamp_min / clamp_max give.
template <class T, bool UPPER, bool SHARED>
struct ReluStepGrad {
  const T* grad_out;
  const T* grad_bias;
  const T* A;
  LinesAt<T, UPPER, SHARED> lines;
  T* grad_A;
  T* chord_g;
  T* chord_gb;
  int64_t specs, neurons;
  bool broadcast;

  C10_HOST_DEVICE void operator()(int64_t b, int64_t s, int64_t n) const {
    const int64_t row = b * specs + s, i = b * neurons + n;
    const T a = A[((broadcast ? 0 : b) * specs + s) * neurons + n];
    const T g = grad_out[row * neurons + n], g_b = grad_bias[row];
    const Lines<T> l = lines(i);
    // select(), not T(a > 0): GCC does not vectorise a bool-to-float conversion here.
    const bool on_pos = a > T(0), on_neg = a < T(0);
    grad_A[row * neurons + n] = g * (box::select(on_pos, l.pos_slope) + box::select(on_neg, l.neg_slope)) +
                                g_b * box::select(UPPER ? on_pos : on_neg, l.intercept);
    const T pos = box::relu(a);
    const T chord_coef = UPPER ? pos : a - pos;  // the coefficient multiplying the chord
    // select() masks the bits, so whatever the uninitialised slot held (NaN included) is 0.
    chord_g[i] = box::select(s != 0, chord_g[i]) + chord_coef * g;
    chord_gb[i] = box::select(s != 0, chord_gb[i]) + chord_coef * g_b;
  }
};

// Per neuron i: the gradients of the bounds from the sums ReluStepGrad accumulated, in place
// (grad_lower holds sum chord * g on entry, grad_upper sum chord * g_bias). Only the chord
// depends on the bounds: its slope k and intercept t.
template <class T>
struct ChordGrad {
  const T* lower;
  const T* upper;
  T* grad_lower;
  T* grad_upper;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const Relaxation<T> r = relax(lower[i], upper[i]);
    const T sum_g = grad_lower[i], sum_gb = grad_upper[i];
    grad_lower[i] = sum_g * r.dk_dl + sum_gb * r.dt_dl;
    grad_upper[i] = sum_g * r.dk_du + sum_gb * r.dt_du;
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
