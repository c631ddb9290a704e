// Per-element formulas of CROWN's backward steps, for CPU and CUDA alike: through a ReLU (its
// linear relaxation, applied to A) and the bias term of the step through an affine layer.
// reference.py holds the same formulas in plain torch (relu_relaxation, crown_relu_backward,
// crown_linear_backward, crown_conv2d_backward); keep the two in step.
//
// Through a ReLU: a linear bound sum_n A[n] relu(z[n]) is bounded, given pre-activation bounds
// l <= z <= u, by replacing relu with a line: the upper line k z + t (the chord on unstable
// neurons), the lower line lam z (CROWN's adaptive slope: 1 when u >= -l, else 0). A positive
// coefficient takes the line on its own side, a negative one the other side's line.
//
// Through an affine layer h' = W h + b: walking a linear bound A h' back to A W h + A b adds
// the bias term, the sum over output neurons of A * b, where b is per channel.
#pragma once

#include <robprune/elementwise.h>

#include <c10/macros/Macros.h>

#include <cstdint>

namespace robprune::crown {

// --- through a ReLU ---

template <class T>
struct Relaxation {
  T upper_slope, upper_intercept, lower_slope;
  // Derivatives of the chord's slope k and intercept t; zero off the unstable set, where the
  // lines do not depend on l and u.
  T dk_dl, dk_du, dt_dl, dt_du;
};

// Overflow never tightens the relaxation: where l, u or u - l is not finite (the width
// overflowed, or a bound is infinite), the chord's slope u / (u - l) would round to 0 and
// silently drop the neuron. There the three lines are NaN instead, and so is every bound
// through them, which never certifies; their derivatives are 0, as for any constant.
template <class T>
C10_HOST_DEVICE inline Relaxation<T> relax(T l, T u) {
  // u - l is finite exactly when l, u and u - l all are; w - w is 0 then, NaN otherwise.
  const T w = u - l;
  const T finite_or_nan = w - w;
  const bool finite = finite_or_nan == T(0);
  // Multiplying by 1 keeps every value bit for bit (signed zeros included); by NaN, none.
  const T keep = T(1) + finite_or_nan;
  // select(), never T(bool): GCC does not vectorise bool-to-float conversions.
  const bool unstable = (l < T(0)) & (u > T(0)) & finite;
  const bool active = l >= T(0);
  // Off the unstable set the width is replaced by 1, so no inf or NaN is ever formed there.
  const T width = select(unstable, w) + select(!unstable, T(1));
  const T inv = T(1) / width;
  const T k = u / width;
  Relaxation<T> r;
  r.upper_slope = (select(unstable, k) + select(active, T(1))) * keep;
  r.upper_intercept = select(unstable, -k * l) * keep;
  r.lower_slope = (select(unstable & (u >= -l), T(1)) + select(active, T(1))) * keep;
  const T inv2 = inv * inv;
  r.dk_dl = select(unstable, u * inv2);
  r.dk_du = select(unstable, -l * inv2);
  r.dt_dl = select(unstable, -u * u * inv2);
  r.dt_du = select(unstable, l * l * inv2);
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
      const T pos = relu(an), neg = an - pos;
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
    grad_A[row * neurons + n] = g * (select(on_pos, l.pos_slope) + select(on_neg, l.neg_slope)) +
                                g_b * select(UPPER ? on_pos : on_neg, l.intercept);
    const T pos = relu(a);
    const T chord_coef = UPPER ? pos : a - pos;  // the coefficient multiplying the chord
    // select() masks the bits, so whatever the uninitialised slot held (NaN included) is 0.
    chord_g[i] = select(s != 0, chord_g[i]) + chord_coef * g;
    chord_gb[i] = select(s != 0, chord_gb[i]) + chord_coef * g_b;
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

// --- the bias term of an affine layer ---

// Row functor for Backend::rows_sum over A's flat buffer cut into rows of `cols` elements.
// PER_ROW_CHANNEL (NCHW conv layers): a row is one channel plane, so the channel is fixed
// along it and its bias is read once per row. Otherwise (linear layers, channels_last conv
// layers): a row lists the channels of one pixel, element j being channel j.
template <class T, bool PER_ROW_CHANNEL>
struct BiasDot {
  const T* A;
  const T* bias;
  int64_t cols, channels;

  struct Row {
    const T* a;
    const T* bias;
    T row_bias;
    C10_HOST_DEVICE T operator()(int64_t j) const { return a[j] * (PER_ROW_CHANNEL ? row_bias : bias[j]); }
  };
  C10_HOST_DEVICE Row row(int64_t r) const {
    return {A + r * cols, bias, PER_ROW_CHANNEL ? bias[r % channels] : T(0)};
  }
};

}  // namespace robprune::crown
