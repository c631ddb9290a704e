// Per-element formulas of interval (box) propagation, written once for CPU and CUDA.
//
// A box is (centre c, radius r >= 0), i.e. the interval [c - r, c + r]. Each functor handles
// element i of flat, identically laid out buffers; for_each_{cpu,cuda} spread i over threads.
// reference.py holds the same formulas in plain torch; keep the two in step.
#pragma once

#include <robprune/elementwise.h>

#include <c10/macros/Macros.h>

#include <cstdint>

namespace robprune::interval {

// Validates the radius (NaN and negative entries are invalid) and, with RELU, maps the box
// through ReLU: [c - r, c + r] -> [relu(c - r), relu(c + r)], back in centre/radius form.
template <class T, bool RELU>
struct Prologue {
  const T* c;
  const T* r;
  T* c_out;
  T* r_out;
  C10_HOST_DEVICE bool operator()(int64_t i) const {
    const T ci = c[i], ri = r[i];
    if (RELU) {
      const T lo = relu(ci - ri), hi = relu(ci + ri);
      // Halves first: hi + lo overflows near the top of the float range, and an infinite
      // centre with a finite radius is the box [inf, inf], above every value it should hold.
      // 0 <= lo <= hi, so hi - lo cannot overflow.
      c_out[i] = hi / T(2) + lo / T(2);
      r_out[i] = (hi - lo) / T(2);
    }
    return !(ri >= T(0));
  }
};

// Gradient of Prologue<T, true> with respect to (c, r), given the gradient at its output.
// relu'(x) is taken as [x > 0], as torch.relu's backward does.
template <class T>
struct PrologueBackward {
  const T* g_c_out;
  const T* g_r_out;
  const T* c;
  const T* r;
  T* g_c;
  T* g_r;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const T sum = (g_c_out[i] + g_r_out[i]) / T(2), diff = (g_c_out[i] - g_r_out[i]) / T(2);
    const T g_hi = select(c[i] + r[i] > T(0), sum);
    const T g_lo = select(c[i] - r[i] > T(0), diff);
    g_c[i] = g_hi + g_lo;
    g_r[i] = g_hi - g_lo;
  }
};

// Epilogue, in place: (centre, radius) -> (lower, upper).
template <class T>
struct ToBounds {
  T* a;
  T* b;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const T c = a[i], r = b[i];
    a[i] = c - r;
    b[i] = c + r;
  }
};

// Gradient of ToBounds: from (grad lower, grad upper) to (grad centre, grad radius).
template <class T>
struct ToBoundsBackward {
  const T* g_lower;
  const T* g_upper;
  T* g_c;
  T* g_r;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    g_c[i] = g_upper[i] + g_lower[i];
    g_r[i] = g_upper[i] - g_lower[i];
  }
};

// The input box of a verification problem: the L-inf ball of radius eps around x intersected
// with [0, 1], pushed through the model's per-channel normalisation h = x * scale + shift,
// in one pass (one read of x, the two outputs written once). Run by for_each_nested_any over
// (N, C, plane): the channel is the middle index, never row % C, because GCC does not vectorise
// the loop with a per-element modulo in it (scalar code ran 5x slower). Returns true for
// invalid input (x outside [0, 1] or NaN, eps < 0 or NaN), which the pass checks along the way.
// SCALAR_EPS: one eps for every element.
template <class T, bool SCALAR_EPS>
struct InputBox {
  const T* x;
  const T* eps;
  const T* scale;
  const T* shift;
  T* c;
  T* r;
  int64_t channels, plane;
  C10_HOST_DEVICE bool operator()(int64_t n, int64_t ch, int64_t i) const {
    const int64_t k = (n * channels + ch) * plane + i;
    const T xk = x[k], e = eps[SCALAR_EPS ? 0 : k];
    // Ternaries written as min / max: GCC vectorises these (unlike bool-to-float conversions).
    const T below = xk - e, above = xk + e;
    const T lo = below < T(0) ? T(0) : below;
    const T hi = above > T(1) ? T(1) : above;
    const T s = scale[ch];
    c[k] = (hi + lo) / T(2) * s + shift[ch];
    r[k] = (hi - lo) / T(2) * (s < T(0) ? -s : s);
    return !((xk >= T(0)) & (xk <= T(1)) & (e >= T(0)));
  }
};

// The two weights an interval layer multiplies by: W * M for the centre and |W * M| for the
// radius, written to the halves of one (2, *W.shape) buffer.
template <class T, bool MASKED>
struct WeightPair {
  const T* w;
  const T* m;
  T* w_eff;
  T* w_abs;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const T v = MASKED ? w[i] * m[i] : w[i];
    w_eff[i] = v;
    w_abs[i] = v < T(0) ? -v : v;  // std::abs is not a device function for every T
  }
};

// Gradient of a layer with respect to W and M, from the gradients g_c and g_r of its products
// with respect to W * M and |W * M|: g = g_c + sign(W * M) g_r, dW = g M, dM = g W. Layers
// that use W * M alone (CROWN's backward steps) have no g_r: ABS false. Either output may be
// null when it is not wanted.
template <class T, bool MASKED, bool ABS>
struct WeightGrad {
  const T* g_c;
  const T* g_r;
  const T* w;
  const T* m;
  T* g_w;
  T* g_m;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const T v = MASKED ? w[i] * m[i] : w[i];
    const T g = ABS ? g_c[i] + sign(v) * g_r[i] : g_c[i];
    if (g_w) g_w[i] = MASKED ? g * m[i] : g;
    if (MASKED && g_m) g_m[i] = g * w[i];
  }
};

}  // namespace robprune::interval
