// The numerics of the field and of the flow, defined once for every compiled backend: the CPU
// kernels (csrc/cpu, per-lane SIMD vectors), the CUDA kernels (csrc/cuda, one pair per thread)
// and the host emulator of the CUDA kernels (csrc/cuda/emulate). Mathematics:
// docs/DESIGN.md, "The field operator" (field, gradients) and docs/DESIGN.md, "The flow" (flow), in base 2 as
// the kernels compute it:
//
//   r2_ij = max(||x_i - y_j||^2 + e_i^2, floor)      floor: smallest normal of the INPUT dtype
//   s_ij  = log2 w_j - (p/2) log2 r2_ij               (kNoCharge for excluded/zero-weight pairs)
//   pi_ij = 2^(s_ij - lse2_i),   lse2_i = log2 sum_j 2^s_ij
//
// Every function is written against a math policy M (below: ScalarMath for one value, the CPU's
// VecMath for a SIMD vector of pairs) so that the scalar CUDA code and the vectorised CPU code
// run the same formula, operation for operation; fused multiply-adds are explicit (M::fma) so
// that nvcc and the host compiler contract the same operations.
//
// Linkage: the CPU kernels are compiled once per instruction set, each copy in its namespace
// PF_ISA_NS; this header puts its code into that namespace too, so that an inline function
// compiled with AVX-512 instructions can never be picked by the linker for the generic copy.
// Elsewhere (CUDA, the bindings, the emulator) it lives in poissonflow::numerics.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define POISSONFLOW_HD __host__ __device__ __forceinline__
#else
#define POISSONFLOW_HD inline
#endif

#if defined(PF_ISA_NS)
#define PF_NUMERICS_NS PF_ISA_NS
#else
#define PF_NUMERICS_NS numerics
#endif

namespace poissonflow {
namespace PF_NUMERICS_NS {

// ---- Sentinels and the r2 floor -------------------------------------------------------------

// Input dtypes, for the floor rule. float16/bfloat16 inputs are computed in float32 but keep the
// floor of their own dtype, so that a query exactly on a charge gets the same (finite) score as
// in the float64 reference evaluated on the same inputs.
enum InputDtype : int32_t {
  kInputFloat32 = 0,
  kInputFloat64 = 1,
  kInputFloat16 = 2,
  kInputBFloat16 = 3,
};

// Smallest normal number of the input dtype: the floor of r2 (a query on a charge, eps = 0,
// is defined behaviour: that charge dominates and contributes exactly 0 to v).
POISSONFLOW_HD constexpr double r2_floor(int32_t input_dtype) {
  return input_dtype == kInputFloat64   ? 2.2250738585072014e-308  // 2^-1022
         : input_dtype == kInputFloat16 ? 6.103515625e-05          // 2^-14
                                        : 1.1754943508222875e-38;  // 2^-126: float32, bfloat16
}

POISSONFLOW_HD constexpr bool valid_input_dtype(int32_t input_dtype) {
  return input_dtype >= kInputFloat32 && input_dtype <= kInputBFloat16;
}

// kNoCharge: score of a padding lane, an excluded pair or a zero-weight charge. Finite, so that
// no inf - inf appears in the running max, and far below any real score.
// kTiny: the floor when the input dtype is the compute dtype (the CPU kernels).
template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float kNoCharge = -1e30f;
  static constexpr float kTiny = 1.17549435e-38f;
};
template <>
struct Limits<double> {
  static constexpr double kNoCharge = -1e300;
  static constexpr double kTiny = 2.2250738585072014e-308;
};

// A score (or running max) counts as a real charge when it is above this fraction of kNoCharge.
constexpr double kRealScoreFraction = 0.5;

// Lazy rescaling threshold (log2 units): the running max moves only when a tile beats it by more
// than kTau, so weights 2^(s - m) stay below 2^kTau and rescaling the accumulators is rare.
constexpr int kTau = 8;

// ---- Math policies --------------------------------------------------------------------------

// One value per call (CUDA threads, the emulator, the CPU's per-row scalars), T float or double.
template <typename T>
struct ScalarMath {
  typedef T S;
  typedef T V;
  static POISSONFLOW_HD T exp2(T a) {
    if constexpr (sizeof(T) == 4) return ::exp2f(a); else return ::exp2(a);
  }
  static POISSONFLOW_HD T log2(T a) {
    if constexpr (sizeof(T) == 4) return ::log2f(a); else return ::log2(a);
  }
  static POISSONFLOW_HD T fma(T a, T b, T c) {
    if constexpr (sizeof(T) == 4) return ::fmaf(a, b, c); else return ::fma(a, b, c);
  }
  static POISSONFLOW_HD T max(T a, T b) { return a > b ? a : b; }
  static POISSONFLOW_HD T select(bool m, T a, T b) { return m ? a : b; }
  static POISSONFLOW_HD T splat(T a) { return a; }
};

// ---- Forward: scores and the online softmax -------------------------------------------------

// Per value (bool) or per lane (a SIMD mask) of a vector of scores of element type T.
template <typename T, typename V>
POISSONFLOW_HD auto real_score_mask(V s) -> decltype(s > (T)0) {
  return s > (T)(Limits<T>::kNoCharge * (T)kRealScoreFraction);
}

template <typename T>
POISSONFLOW_HD bool is_real_score(T s) {
  return real_score_mask<T>(s);
}

// log2 of a charge weight; a zero weight is no charge.
template <class M>
POISSONFLOW_HD typename M::S log2_weight(typename M::S w) {
  typedef typename M::S T;
  return w > (T)0 ? M::log2(w) : Limits<T>::kNoCharge;
}

// Score of a pair whose r2 (direct differences, plus e_i^2) is r2c; lw = log2 w_j.
// Zero-weight and padding charges (lw = kNoCharge) keep exactly kNoCharge.
template <class M>
POISSONFLOW_HD typename M::V pair_score(typename M::V r2c, typename M::V lw, typename M::S half_p,
                                        typename M::S tiny) {
  typedef typename M::S T;
  const typename M::V s = M::fma(M::splat(-half_p), M::log2(M::max(r2c, M::splat(tiny))), lw);
  return M::select(real_score_mask<T>(lw), s, M::splat(Limits<T>::kNoCharge));
}

// The lazy online-softmax decision for one row and one tile whose largest score is `tile_max`.
// Updates the running max `m` and returns the factor (alpha) by which the row's accumulators and
// running sum must be multiplied: 1 when m did not move, 0 when nothing was accumulated yet.
template <class M>
POISSONFLOW_HD typename M::S online_max_update(typename M::S& m, typename M::S tile_max) {
  typedef typename M::S T;
  if (is_real_score(tile_max) && (!is_real_score(m) || tile_max > m + (T)kTau)) {
    const T alpha = is_real_score(m) ? M::exp2(m - tile_max) : (T)0;
    m = tile_max;
    return alpha;
  }
  return (T)1;
}

// Weight of a pair relative to the row's running max m (a real score: rows whose m is not real
// have no weight at all, see online_weight_or_zero).
template <class M>
POISSONFLOW_HD typename M::V online_weight(typename M::V s, typename M::S m) {
  return M::exp2(s - M::splat(m));
}

template <class M>
POISSONFLOW_HD typename M::V online_weight_or_zero(typename M::V s, typename M::S m) {
  return is_real_score(m) ? online_weight<M>(s, m) : M::splat((typename M::S)0);
}

// A row that no charge reaches (every weight zero or its only charge excluded) has no field.
template <typename T>
POISSONFLOW_HD bool row_is_dead(T m, T l) {
  return !(l > (T)0) || !is_real_score(m);
}

// v = x - mu = -(sum_j p_j (y_j - x)) / sum_j p_j.
template <typename T>
POISSONFLOW_HD T field_from_acc(T acc, T l, bool dead) {
  return dead ? (T)0 : -acc / l;
}

// lse2 = m + log2 l, in double for one final rounding.
template <typename T>
POISSONFLOW_HD T row_lse2(T m, T l, bool dead) {
  return dead ? (T)-INFINITY : (T)((double)m + ::log2((double)l));
}

// ---- Backward: the per-pair gradient term ---------------------------------------------------

// With h_ij = g_v,i . (x_i - y_j) - (g_v,i . v_i - g_l,i) and u_ij = log2(pi_ij / w_j)
// = -(p/2) log2 r2_ij - lse2_i:
//   pi = pi_ij,   a = p pi_ij h_ij / r2_ij   (0 where r2 is clamped at the floor: no slope there),
//   pw = (pi_ij / w_j) h_ij = 2^u_ij h_ij    (finite also at w_j = 0; pair_weight_gradient),
// so that dL/dx_i = g_v,i + sum_j a_ij (y_j - x_i), dL/dy_j = sum_i a_ij (x_i - y_j) - pi_ij g_v,i
// and sum_i pw_ij = sum_i gs_ij / w_j.
template <class V>
struct PairGrad {
  V pi, a, u, h;
};

// The term of a pair that counts. Excluded pairs, padding pairs and dead rows must be replaced
// by zeros by the caller with a select, never multiplied by a 0/1 mask: at an exact coincidence
// the excluded pair's r2 is the floor, its 2^u overflows to inf, and inf * 0 is NaN.
//   r2c = ||x - y||^2 + e^2 (unclamped), gdot = g_v . (x - y), lw = log2 w_j,
//   lse2 = the row's log2-sum-exp, dl = g_v . v - g_l of the row.
template <class M>
POISSONFLOW_HD PairGrad<typename M::V> pair_gradient(typename M::V r2c, typename M::V gdot,
                                                     typename M::V lw, typename M::S lse2,
                                                     typename M::S dl, typename M::S power,
                                                     typename M::S half_p, typename M::S tiny) {
  typedef typename M::S T;
  typedef typename M::V V;
  const V r2 = M::max(r2c, M::splat(tiny));
  PairGrad<V> g;
  g.u = M::fma(M::splat(-half_p), M::log2(r2), M::splat(-lse2));
  g.h = gdot - M::splat(dl);
  g.pi = M::exp2(lw + g.u);  // lw = kNoCharge (zero weight, padding): 2^-huge = 0
  g.a = M::select(r2c < M::splat(tiny), M::splat((T)0), (M::splat(power) * (g.pi * g.h)) / r2);
  return g;
}

// (pi_ij / w_j) h_ij of a pair, for dL/dw (a separate exp2: only needed when w has a gradient).
template <class M>
POISSONFLOW_HD typename M::V pair_weight_gradient(const PairGrad<typename M::V>& g) {
  return M::exp2(g.u) * g.h;
}

// ---- The flow: Euler and classic RK4 in t = log z (docs/DESIGN.md, "The flow") ---------------

// Butcher tableau of classic RK4 with the weights kept as integers over one denominator:
//   k1 = v(x, t), k2 = v(x + dt/2 k1, t + dt/2), k3 = v(x + dt/2 k2, t + dt/2),
//   k4 = v(x + dt k3, t + dt),  x <- x + dt/6 (k1 + 2 k2 + 2 k3 + k4).
constexpr int kRk4Stages = 4;
constexpr int kRk4WeightDenominator = 6;
// c_s: time offset of stage s (0-based) in units of dt.
POISSONFLOW_HD constexpr double rk4_c(int stage) {
  return stage == 0 ? 0.0 : (stage == 3 ? 1.0 : 0.5);
}
// a_(s+1,s): the next stage's input is x + a dt k_s (the tableau is diagonal), s = 0, 1, 2.
POISSONFLOW_HD constexpr double rk4_a(int stage) { return stage == 2 ? 1.0 : 0.5; }
// Weight numerators of k_s over kRk4WeightDenominator.
POISSONFLOW_HD constexpr int rk4_b(int stage) { return stage == 1 || stage == 2 ? 2 : 1; }

// Height squared z^2 = exp(2 t) of a stage at t = t0 + (step + c) dt, in double (the time axis
// is long: t0 + step dt must not lose the step's bits).
POISSONFLOW_HD double stage_height2(double t0, double dt, int64_t step, double c) {
  return ::exp(2.0 * (t0 + ((double)step + c) * dt));
}

// One RK4 stage's update of one state entry: v = k_stage, `base` is x at the start of the step,
// `comb` the running weighted sum of slopes. Returns the input of the next stage; after the last
// stage `base` holds the new state (and is returned).
template <class M>
POISSONFLOW_HD typename M::S rk4_stage_update(int stage, typename M::S v, typename M::S dt,
                                              typename M::S& base, typename M::S& comb) {
  typedef typename M::S T;
  comb = stage == 0 ? v : M::fma((T)rk4_b(stage), v, comb);
  if (stage < kRk4Stages - 1) return M::fma((T)rk4_a(stage) * dt, v, base);
  base = M::fma(dt / (T)kRk4WeightDenominator, comb, base);
  return base;
}

template <class M>
POISSONFLOW_HD typename M::S euler_update(typename M::S x, typename M::S v, typename M::S dt) {
  return M::fma(dt, v, x);
}

// ---- The constants by name (host only): numerics() of the Python modules -------------------

#if !defined(__CUDA_ARCH__)
// Calls f(name, value, is_integer) for every constant above; the keys of numerics().
template <class F>
inline void for_each_constant(F&& f) {
  f("no_charge_float32", (double)Limits<float>::kNoCharge, false);
  f("no_charge_float64", Limits<double>::kNoCharge, false);
  f("real_score_fraction", kRealScoreFraction, false);
  f("r2_floor_float16", r2_floor(kInputFloat16), false);
  f("r2_floor_bfloat16", r2_floor(kInputBFloat16), false);
  f("r2_floor_float32", r2_floor(kInputFloat32), false);
  f("r2_floor_float64", r2_floor(kInputFloat64), false);
  f("input_dtype_float32", (double)kInputFloat32, true);
  f("input_dtype_float64", (double)kInputFloat64, true);
  f("input_dtype_float16", (double)kInputFloat16, true);
  f("input_dtype_bfloat16", (double)kInputBFloat16, true);
  f("lazy_rescale_tau_log2", (double)kTau, true);
  f("rk4_stages", (double)kRk4Stages, true);
  f("rk4_weight_denominator", (double)kRk4WeightDenominator, true);
  static const char* const c_names[] = {"rk4_c1", "rk4_c2", "rk4_c3", "rk4_c4"};
  static const char* const b_names[] = {"rk4_b1", "rk4_b2", "rk4_b3", "rk4_b4"};
  static const char* const a_names[] = {"rk4_a21", "rk4_a32", "rk4_a43"};
  for (int s = 0; s < kRk4Stages; ++s) {
    f(c_names[s], rk4_c(s), false);
    f(b_names[s], (double)rk4_b(s) / kRk4WeightDenominator, false);
    if (s < kRk4Stages - 1) f(a_names[s], rk4_a(s), false);
  }
}
#endif

}  // namespace PF_NUMERICS_NS
}  // namespace poissonflow
