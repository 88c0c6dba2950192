// Per-thread arithmetic of the CUDA field kernels: the shared numerics of
// common/field_numerics.h (docs/DESIGN.md, "The field operator" and docs/DESIGN.md, "The flow") instantiated
// for one pair per thread, with the masks the block program needs. Shared verbatim by the device
// code (nvcc) and by the host emulator (g++, csrc/cuda/emulate/); every fused multiply-add is
// explicit, so the two contract the same operations and differ only in the last-ulp accuracy of
// exp2/log2 (the CUDA math library against libm).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/field_numerics.h"

// PF_HD: host and device (POISSONFLOW_HD); PF_DEV: the block program, device-only under nvcc
// and plain inline host code in the emulator.
#define PF_HD POISSONFLOW_HD
#if defined(__CUDACC__)
#define PF_DEV __device__ __forceinline__
#else
#define PF_DEV inline
#endif

namespace poissonflow {
namespace cuda {

using numerics::Limits;

template <typename T>
using Math = numerics::ScalarMath<T>;

// log2 of charge j's weight; absent weights (w == nullptr) are all 1.
template <typename T>
PF_HD T charge_log2_weight(const T* w, int64_t j) {
  return w == nullptr ? (T)0 : numerics::log2_weight<Math<T>>(w[j]);
}

// Score of a pair (r2c = r2 by direct differences + e^2); padding rows and excluded pairs
// (valid = false) get kNoCharge.
template <typename T>
PF_HD T masked_score(T r2c, T lw, T half_p, T tiny, bool valid) {
  return valid ? numerics::pair_score<Math<T>>(r2c, lw, half_p, tiny) : Limits<T>::kNoCharge;
}

// The backward terms of one pair (field_numerics.h, pair_gradient): pi, a = p gs / r2 and
// pw = (pi / w) h.
template <typename T>
struct PairTerm {
  T pi, a, pw;
};

// Gradient terms of a pair; zeros for excluded and padding pairs (valid = false) and for dead
// rows (lse2 = -inf: no charge reaches the query, every pi is 0). A branch, never a 0/1 factor:
// an excluded pair at an exact coincidence has 2^u = inf.
template <typename T>
PF_HD PairTerm<T> masked_pair_gradient(T r2c, T gdot, T lw, T lse2, T dl, T power, T half_p,
                                       T tiny, bool valid) {
  if (!valid || !(lse2 > (T)-INFINITY)) return PairTerm<T>{(T)0, (T)0, (T)0};
  const numerics::PairGrad<T> g =
      numerics::pair_gradient<Math<T>>(r2c, gdot, lw, lse2, dl, power, half_p, tiny);
  return PairTerm<T>{g.pi, g.a, numerics::pair_weight_gradient<Math<T>>(g)};
}

}  // namespace cuda
}  // namespace poissonflow
