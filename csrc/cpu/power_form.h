// Power-form softmax weights of the CPU kernels (docs/DESIGN.md, "Weights without log/exp: the power form").
//
// The log-domain kernels compute, per pair, s = log2 w - (p/2) log2 r2 and a weight 2^(s - m)
// relative to the row's running maximum m: one log2 and one exp2 per pair, about 35 vector
// instructions, which at D = 3 cost three times the distance and accumulation work. When 2p
// is an integer (p = D or D + 1 for the field and the flow, and any half-integer power) the
// same weight is a power with a rational exponent and needs neither:
//
//   q_ij = g_j / r2_ij,  g_j = (w_j / w_max)^(2/p)          (0 for zero weights and padding)
//   s_ij = log2 w_max + (p/2) log2 q_ij
//   2^(s_ij - m_i) = (q_ij / Q_i)^(p/2),  Q_i = 2^((m_i - log2 w_max) / (p/2)),
//
// so the row keeps its reference as Q (the largest q seen, lazily: the online softmax of
// common/field_numerics.h with the same kTau rule, in q units), a pair costs one division, one
// multiplication by 1/Q and t^(p/2) by repeated squaring plus at most two square roots
// (p/2 = whole + quarters/4), and the online rescaling stays exact: alpha = (Q_old/Q_new)^(p/2).
// Weights below 2^-126 of the reference (2^-1022 in double) are exactly 0, as the log-domain
// exp2 makes them; the base is clamped to the cut first, so no power ever underflows into the
// subnormal range (slow on x86) and, since every weight is at most 2^kTau, none overflows.
// Normalising g by w_max keeps q <= 1 / floor finite at an exact coincidence.
//
// Range: q must stay a normal number for every pair that can carry weight. The plan (below)
// takes the power form only when the smallest possible q, from a bound on r2 (the largest
// coordinates, the dimension and the largest softening) and the smallest positive weight, is
// above kMinQ, and only from p/2 = 1 up: below it the cut lies under the normal numbers, so a
// base t = q / Q can be subnormal (a few bits) or 0 while its weight t^(p/2) is a normal number
// that counts (at p = 1, D = 1, a query on a charge and a charge 1000 away: t ~ 1e-44, its
// weight ~ 1e-22, 3% off). Otherwise, and when 2p is not an integer, the kernels use the log
// domain.
// Accuracy: t carries one rounding (the division), and t^(p/2) amplifies it p/2-fold plus one
// rounding per multiplication: about p ulp of relative error in a weight; the log-domain form
// rounds log2 r2 and s, an error of about (p/2) |log2 r2| ulp, so the power form is never
// worse for r2 away from 1 (the conformance suite checks both forms against float64). A square
// root enters once, not amplified: on AVX-512 float, for 1 <= p/2 < kNewtonMaxWhole + 1, every
// other weight vector takes it from simd.h vsqrt_newton (about 1 ulp instead of 0.5), so that
// the divider and the FMA pipes share the roots (field_tile.h power_row_run).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/field_numerics.h"
#include "simd.h"

namespace poissonflow {
namespace PF_ISA_NS {

// How one call computes its weights: the exponent split p/2 = whole + quarters / 4 and the
// cut below which a weight is exactly 0 (in units of t = q / Q).
template <typename T>
struct PowerPlan {
  bool enabled = false;
  int whole = 0;      // integer part of p/2
  int quarters = 0;   // 0..3
  T cut = (T)0;       // 2^(-kMinExp / (p/2)): t below it gives weight 0
  T tau_factor = (T)0;  // 2^(kTau / (p/2)): the lazy rule's threshold in q units
  double w_max = 1.0;   // the largest weight (set by the caller, 1 without weights)
  double half_p = 0.0;
  // Square roots may take vsqrt_newton (simd.h): this copy has it, every root's argument, at
  // least the cut, is a normal number (p/2 >= 1), and the weight's own multiplications are few
  // (whole <= kNewtonMaxWhole)
  bool newton_sqrt = false;
};

// The largest whole part of p/2 whose square roots share the FMA pipes. Measured on the Zen 4
// (docs/performance.md, "Half the roots on the FMA pipes"): the forward 7% faster at D = 5
// (p/2 = 2.5) and 2.5% at D = 9 (4.5), nothing measurable from D = 17 (8.5) up, where the
// squarings keep the FMA pipes as busy as the roots keep the divider. Above it the roots stay
// on the divider, correctly rounded, so that the flows at the studies' p = 129 keep the bits
// of their committed results.
constexpr int kNewtonMaxWhole = 4;

// The smallest q = g / r2 the power form accepts (a normal number with a margin of 1e8).
template <typename T>
struct PowerLimits;
template <>
struct PowerLimits<float> {
  static constexpr double kMinQ = 1e-30;
  static constexpr double kMinExp = 126.0;  // weights below 2^-126 of the reference: 0
};
template <>
struct PowerLimits<double> {
  static constexpr double kMinQ = 1e-290;
  static constexpr double kMinExp = 1022.0;
};

// The call's plan. weight_form: 0 auto, 1 log domain, 2 power form wherever it applies.
// r2_bound: an upper bound on every pair's r2 (the caller's); wmin_ratio: the smallest positive
// weight over the largest (1 without weights). The power form applies when 2p is an integer
// (2 <= p <= 4096) and the smallest possible q, wmin_ratio^(2/p) / r2_bound, is at least kMinQ.
template <typename T>
static inline PowerPlan<T> power_plan(double power, int weight_form, double r2_bound,
                                      double wmin_ratio) {
  PowerPlan<T> plan;
  const double two_p = 2.0 * power;
  const bool applies = power >= 2.0 && power <= 4096.0 && two_p == floor(two_p);
  if (weight_form == 1 || !applies) return plan;
  const double log_qmin = log(wmin_ratio) / (0.5 * power) - log(r2_bound > 1.0 ? r2_bound : 1.0);
  if (!(wmin_ratio > 0.0) || !(log_qmin >= log(PowerLimits<T>::kMinQ))) return plan;
  const int64_t fourths = (int64_t)two_p;  // p/2 in quarters
  plan.enabled = true;
  plan.whole = (int)(fourths / 4);
  plan.quarters = (int)(fourths % 4);
  plan.half_p = 0.5 * power;
  plan.cut = (T)exp2(-PowerLimits<T>::kMinExp / plan.half_p);
  plan.tau_factor = (T)exp2((double)kTau / plan.half_p);
  plan.newton_sqrt =
      kNewtonForms<T> && plan.cut >= Limits<T>::kTiny && plan.whole <= kNewtonMaxWhole;
  return plan;
}

// t^(p/2) for t in [cut, 2^(kTau / (p/2))] on K vectors at once: binary exponentiation of the
// whole part (a fixed sequence of multiplications for a given p, so the result never depends on
// the thread), then t^(1/2) and t^(1/4) by square roots. Each vector gets the same
// multiplications in the same order whatever K (so the same bits). K > 1 is for latency: one
// vector's squaring chain is a string of dependent multiplications (and a square root) that,
// vector after vector with the exponent's bits tested in between, held the weights' phase to
// about a third of the multiply pipes' rate; K independent chains stepped together fill them.
//
// kQuarters: plan.quarters when the caller knows it at compile time (power_row_weights
// dispatches on it once per row), -1 to read it from the plan. A run-time test around the
// square roots made GCC keep r in memory (four stores and reloads on the square roots' path).
// kNewtonMask: the vectors i (bit i) whose square roots take vsqrt_newton, for callers that
// checked plan.newton_sqrt; the rest use the divider's. On Zen 4 the divider takes 10 cycles
// for a vector's root, the FMA pipes 5 for vsqrt_newton's, and the rest of a weight is 2
// multiplications at p/2 = 1.5: with every other vector's roots on the pipes the two units
// come close to finishing together where the weights' phase weighs most (small D).
template <typename T, int K, int kQuarters = -1, unsigned kNewtonMask = 0>
static inline void vpow_plan_n(VecT<T> (&t)[K], const PowerPlan<T>& plan) {
  typedef VecT<T> V;
  const int quarters = kQuarters >= 0 ? kQuarters : plan.quarters;
  // r is the product so far. Where the whole part is even, r starts as the first squared factor
  // itself rather than 1 times it (the same bits: 1 x b is exact), one multiplication fewer;
  // the squarings up to that factor run in a loop of their own, so that the main loop has no
  // run-time "is r still 1" select (with it, the weights' loop from L1 was 3% slower:
  // docs/performance.md, "Three changes of the code as compiled"). The plan's p >= 2 makes the
  // whole part at least 1, so r holds a factor by the time the square roots are multiplied in.
  V r[K], b[K];
  for (int i = 0; i < K; ++i) b[i] = t[i];
  int e = plan.whole >> 1;
  if (plan.whole & 1) {
    for (int i = 0; i < K; ++i) r[i] = t[i];
  } else {  // whole >= 2: e has a set bit
    for (;;) {
      for (int i = 0; i < K; ++i) b[i] = b[i] * b[i];
      if (e & 1) break;
      e >>= 1;
    }
    for (int i = 0; i < K; ++i) r[i] = b[i];
    e >>= 1;
  }
  for (; e; e >>= 1) {
    for (int i = 0; i < K; ++i) b[i] = b[i] * b[i];
    if (e & 1)
      for (int i = 0; i < K; ++i) r[i] = r[i] * b[i];
  }
  if (quarters) {
    for (int i = 0; i < K; ++i) {
      const bool newton = (kNewtonMask >> i) & 1;
      const V s = newton ? vsqrt_newton<T>(t[i]) : vsqrt<T>(t[i]);
      if (quarters & 2) r[i] = r[i] * s;
      if (quarters & 1) r[i] = r[i] * (newton ? vsqrt_newton<T>(s) : vsqrt<T>(s));
    }
  }
  for (int i = 0; i < K; ++i) t[i] = r[i];
}

// power_weight on K vectors of one row at once (vpow_plan_n: the same bits as K calls).
template <typename T, int K, int kQuarters = -1, unsigned kNewtonMask = 0>
static inline void power_weight_n(VecT<T> (&q)[K], T inv_q, const PowerPlan<T>& plan) {
  typedef VecT<T> V;
  const V cut = vbroadcast<T>(plan.cut);
  V t[K], c[K];
  for (int i = 0; i < K; ++i) {
    t[i] = q[i] * inv_q;
    c[i] = vmax<T>(t[i], cut);
  }
  vpow_plan_n<T, K, kQuarters, kNewtonMask>(c, plan);
  for (int i = 0; i < K; ++i) q[i] = t[i] < cut ? V{} : c[i];
}

// The weight of pairs with q (a vector) in a row whose reference has inverse inv_q:
// (q / Q)^(p/2), exactly 0 below the cut.
template <typename T>
static inline VecT<T> power_weight(VecT<T> q, T inv_q, const PowerPlan<T>& plan) {
  VecT<T> one[1] = {q};
  power_weight_n<T, 1>(one, inv_q, plan);
  return one[0];
}

// Scalar (Q_old / Q_new)^(p/2) for the online rescaling, in double (rare: once per rescale).
static inline double power_ratio(double q_old, double q_new, double half_p) {
  return pow(q_old / q_new, half_p);
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
