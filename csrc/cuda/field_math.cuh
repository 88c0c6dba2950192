// Per-thread arithmetic of the CUDA field kernels, shared verbatim by the device code (nvcc) and
// by the host emulator (g++, csrc/cuda/emulate/): score of a pair, the lazy online-softmax update,
// the backward pair coefficients and the flow-step epilogues. Everything is written with explicit
// fma() so that nvcc and g++ contract the same operations; the remaining host/device differences
// are the last-ulp accuracies of exp2/log2 (libm against the CUDA math library).
//
// Mathematics (docs/ARCHITECTURE.md), in base 2 as the kernels compute it:
//   r2_ij = max(||x_i - y_j||^2 + e_i^2, tiny)
//   s_ij  = log2 w_j - (p/2) log2 r2_ij                         (log2 of the unnormalised weight)
//   pi_ij = 2^(s_ij - lse2_i),  lse2_i = log2 sum_j 2^s_ij
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#define PF_DEV __device__ __forceinline__
#else
#define PF_HD inline
#define PF_DEV inline
#endif

namespace poissonflow {
namespace cuda {

// Score of a padding row, an excluded pair or a zero-weight charge: finite (no inf - inf in the
// running max), and far below any real score.
template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float kNoCharge = -1e30f;
};
template <>
struct Limits<double> {
  static constexpr double kNoCharge = -1e300;
};

// Running maxima below this are "no real charge seen yet".
template <typename T>
PF_HD bool is_real_score(T s) {
  return s > Limits<T>::kNoCharge * (T)0.5;
}

// Lazy rescaling threshold (log2 units): the running max only moves when a tile beats it by more
// than this, so probabilities stay below 2^kTau and the rescale of the accumulators is rare.
constexpr int kTau = 8;

PF_HD float pf_exp2(float a) { return exp2f(a); }
PF_HD double pf_exp2(double a) { return exp2(a); }
PF_HD float pf_log2(float a) { return log2f(a); }
PF_HD double pf_log2(double a) { return log2(a); }
PF_HD float pf_fma(float a, float b, float c) { return fmaf(a, b, c); }
PF_HD double pf_fma(double a, double b, double c) { return fma(a, b, c); }
template <typename T>
PF_HD T pf_max(T a, T b) {
  return a > b ? a : b;
}

// log2 of a charge weight; zero (or absent, w == nullptr) weights map to kNoCharge / 0.
template <typename T>
PF_HD T log2_weight(const T* w, int64_t j) {
  if (w == nullptr) return (T)0;
  const T wj = w[j];
  return wj > (T)0 ? pf_log2(wj) : Limits<T>::kNoCharge;
}

// Score of one pair from its squared distance accumulated by direct differences.
// `valid` is false for padding rows and excluded pairs.
template <typename T>
PF_HD T pair_score(T r2_raw, T e2, T lw, T half_p, T tiny, bool valid) {
  if (!valid || !is_real_score(lw)) return Limits<T>::kNoCharge;
  const T r2 = pf_max(r2_raw + e2, tiny);
  return pf_fma(-half_p, pf_log2(r2), lw);
}

// The lazy online-softmax decision for one row and one tile whose largest score is `tile_max`.
// Updates the running max `m` and returns the factor (alpha) by which the row's accumulators and
// running sum must be multiplied: 1 when m did not move, 0 when nothing was accumulated yet.
template <typename T>
PF_HD T online_max_update(T& m, T tile_max) {
  if (is_real_score(tile_max) && (!is_real_score(m) || tile_max > m + (T)kTau)) {
    const T alpha = is_real_score(m) ? pf_exp2(m - tile_max) : (T)0;
    m = tile_max;
    return alpha;
  }
  return (T)1;
}

// Probability weight of a pair relative to the row's running max (0 before any real charge).
template <typename T>
PF_HD T online_weight(T s, T m) {
  return is_real_score(m) ? pf_exp2(s - m) : (T)0;
}

// A row that no charge reaches (every weight zero or its only charge excluded) has no field.
template <typename T>
PF_HD bool row_is_dead(T m, T l) {
  return !(l > (T)0) || !is_real_score(m);
}

// v = x - mu = -(sum_j p_j (y_j - x)) / sum_j p_j.
template <typename T>
PF_HD T field_from_acc(T acc, T l, bool dead) {
  return dead ? (T)0 : -acc / l;
}

// lse2 = m + log2 l, in double for the one final rounding (the CPU kernel does the same).
template <typename T>
PF_HD T row_lse2(T m, T l, bool dead) {
  return dead ? (T)-INFINITY : (T)((double)m + log2((double)l));
}

// Backward coefficients of one pair (docs/ARCHITECTURE.md, "Gradients"):
//   gs_ij = pi_ij (g_v,i . (x_i - y_j) - g_v,i . v_i + g_l,i)
//   a_ij  = p gs_ij / r2_ij              (0 where r2 is clamped at tiny: the floor has no slope)
//   pw_ij = (pi_ij / w_j) (g_v,i . (x_i - y_j) - delta_i + g_l,i),  pi/w = 2^(-(p/2) log2 r2 - lse2)
// so that dL/dx_i = g_v,i + sum_j a_ij (y_j - x_i), dL/dy_j = sum_i a_ij (x_i - y_j) - pi_ij g_v,i
// and sum_i pw_ij = sum_i gs_ij / w_j (finite at w_j = 0).
template <typename T>
struct PairGrad {
  T pi, a, pw;
};

template <typename T>
PF_HD PairGrad<T> backward_pair(T r2_raw, T gdot, T e2, T lw, T lse2, T delta, T gl, T half_p,
                                T power, T tiny, bool valid) {
  PairGrad<T> out{(T)0, (T)0, (T)0};
  // A dead row (lse2 = -inf) has pi = 0 everywhere; an excluded or padding pair contributes 0.
  if (!valid || !(lse2 > (T)-INFINITY)) return out;
  const T r2c = r2_raw + e2;
  const bool clamped = r2c < tiny;
  const T r2 = clamped ? tiny : r2c;
  const T t = -half_p * pf_log2(r2);  // log2(pi w^-1 2^lse2)
  const T factor = gdot - delta + gl;
  out.pw = pf_exp2(t - lse2) * factor;
  if (is_real_score(lw)) {
    out.pi = pf_exp2((lw + t) - lse2);
    out.a = clamped ? (T)0 : power * (out.pi * factor) / r2;
  }
  return out;
}

// Classic RK4 in t = log z: the state handed to the next stage and the running combination.
//   k1 = v(x, t), k2 = v(x + dt/2 k1, t + dt/2), k3 = v(x + dt/2 k2, t + dt/2),
//   k4 = v(x + dt k3, t + dt),  x <- x + dt/6 (k1 + 2 k2 + 2 k3 + k4)
// Stage offsets of t in units of dt:
PF_HD double rk4_time_offset(int stage) { return stage == 0 ? 0.0 : (stage == 3 ? 1.0 : 0.5); }

// One stage's epilogue for one state entry. `base` is x at the start of the step, `comb` the
// running k1 + 2 k2 + 2 k3 + k4; returns the input of the next stage (or the new state after the
// fourth stage, when `base` is also updated).
template <typename T>
PF_HD T rk4_epilogue(int stage, T v, T dt, T& base, T& comb) {
  switch (stage) {
    case 0:
      comb = v;
      return pf_fma((T)0.5 * dt, v, base);
    case 1:
      comb = pf_fma((T)2, v, comb);
      return pf_fma((T)0.5 * dt, v, base);
    case 2:
      comb = pf_fma((T)2, v, comb);
      return pf_fma(dt, v, base);
    default:
      comb = comb + v;
      base = pf_fma(dt / (T)6, comb, base);
      return base;
  }
}

template <typename T>
PF_HD T euler_epilogue(T x, T v, T dt) {
  return pf_fma(dt, v, x);
}

}  // namespace cuda
}  // namespace poissonflow
