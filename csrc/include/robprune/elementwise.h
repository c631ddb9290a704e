// Branch-free float helpers the per-element functors of every family share (interval_math.h,
// crown_math.h), written once for CPU and CUDA.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace robprune {

// value where keep holds, else 0, by masking the bits: compilers keep a ternary on floats as a
// branch (IEEE signed zeros forbid them a max instruction), and random data mispredicts it
// half the time; the mask costs two integer ops on both CPU and GPU.
template <class T>
C10_HOST_DEVICE inline T select(bool keep, T value) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(Bits) == sizeof(T), "select() handles float and double");
  Bits bits;
  memcpy(&bits, &value, sizeof(T));
  bits &= Bits(0) - static_cast<Bits>(keep);
  memcpy(&value, &bits, sizeof(T));
  return value;
}

// ReLU that keeps NaN (as torch.relu does), so a NaN input is never hidden as a 0 bound.
template <class T>
C10_HOST_DEVICE inline T relu(T x) {
  return select(!(x <= T(0)), x);
}

template <class T>
C10_HOST_DEVICE inline T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

}  // namespace robprune
