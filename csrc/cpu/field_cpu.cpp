// CPU kernels of the Poisson field, compiled once per instruction set (CMakeLists.txt passes
// -DPF_ISA_NS=... and the matching -m flags). dispatch.cpp picks a copy at run time.
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include "common/field_args.h"
#include "field_backward.h"
#include "field_tile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace poissonflow {
namespace PF_ISA_NS {

// Largest |value| of n values (vectorised; a NaN never raises it, so a NaN input can only make
// the bound smaller, and NaN inputs are refused by the Python layer anyway).
template <typename T>
static double max_abs(const T* p, int64_t n) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  V m = V{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V v = vload<T>(p + i);
    m = vmax<T>(m, v < (T)0 ? -v : v);
  }
  double out = (double)vhmax<T>(m);
  for (; i < n; ++i) out = fabs((double)p[i]) > out ? fabs((double)p[i]) : out;
  return out;
}

// The power-form plan of a call (power_form.h) from a bound on its pairs' r2: with |x|, |y| at
// most X and Y in every coordinate, r2 <= D (X + Y)^2 + e2_max. The largest weight (1 without
// weights) goes into the plan, for pack_weights.
template <typename T>
static PowerPlan<T> call_plan(const FieldArgs& a, double x_bound, double e2_max) {
  const double y_bound = max_abs<T>((const T*)a.y, a.B * a.D);
  const double s = x_bound + y_bound;
  double lo = 1.0, hi = 1.0;  // smallest positive and largest weight
  if (a.w) {
    lo = INFINITY;
    hi = 0.0;
    for (int64_t j = 0; j < a.B; ++j) {
      const double wj = (double)((const T*)a.w)[j];
      if (wj > 0.0) { lo = wj < lo ? wj : lo; hi = wj > hi ? wj : hi; }
    }
    if (!(hi > 0.0)) lo = hi = 1.0;
  }
  PowerPlan<T> plan =
      power_plan<T>(a.power, a.weight_form, (double)a.D * s * s + e2_max, lo / hi);
  plan.w_max = hi;
  return plan;
}

// The plan of a field call (forward and backward): x as it is, the largest softening.
template <typename T>
static PowerPlan<T> field_plan(const FieldArgs& a) {
  const double e2_max = a.eps2_rows ? max_abs<T>((const T*)a.eps2_rows, a.N) : a.eps2;
  return call_plan<T>(a, max_abs<T>((const T*)a.x, a.N * a.D), e2_max);
}

// One parallel region per call: the charges are packed (a work-sharing loop over charge tiles),
// then every query tile [i0, i0 + nq) is handed to body(sc, pk, i0, nq, xs, ks) on the OpenMP
// threads (dynamic: tiles cost the same, but threads share the machine). xs and ks are two
// (QT, D) per-thread buffers, allocated only with kFlowBuffers (the fused flow's state and slope
// combination). The team is the OpenMP runtime's, which is torch's own (poissonflow/_ext.py).
template <typename T, bool kFlowBuffers, class Body>
static int sweep_query_tiles(const FieldArgs& a, const PowerPlan<T>& plan, Body&& body) {
  const TileShape<T> shape = balance_tiles<T>(tile_shape<T>(a.D), a.N, a.num_threads);
  Packed<T> pk;
  if (!pk.allocate(a.B, a.D, shape.CT)) {
    pk.release();
    return 1;
  }
  pack_weights<T>((const T*)a.w, pk, plan);
  const int QT = shape.QT;
  const int64_t ntiles = (a.N + QT - 1) / QT;
  int failed = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    pack_charge_tiles<T>((const T*)a.y, pk);  // ends with the loop's barrier
    TileScratch<T> sc;
    const size_t flow_bytes = kFlowBuffers ? sizeof(T) * QT * a.D : 0;
    T* xs = kFlowBuffers ? (T*)aligned_buffer(flow_bytes) : nullptr;
    T* ks = kFlowBuffers ? (T*)aligned_buffer(flow_bytes) : nullptr;
    const bool ok = sc.allocate(shape, a.D) && (!kFlowBuffers || (xs && ks));
    sc.embed = a.broadcasts == 2;
    if (!ok) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      if (!ok) continue;
      const int64_t i0 = t * QT;
      const int nq = (int)(a.N - i0 < QT ? a.N - i0 : QT);
      body(sc, pk, i0, nq, xs, ks);
    }
    free(xs);
    free(ks);
    sc.release();
  }
  pk.release();
  return failed;
}

template <typename T, bool kPower>
static int forward_run(const FieldArgs& a, const PowerPlan<T>& plan) {
  const T half_p = (T)(0.5 * a.power);
  return sweep_query_tiles<T, false>(a, plan, [&](TileScratch<T>& sc, const Packed<T>& pk,
                                                  int64_t i0, int nq, T*, T*) {
    load_query_tile<T>(sc, a, i0, nq);
    field_tile<T, kPower>(sc, pk, half_p, nq, plan);
    T* v = (T*)a.v + i0 * a.D;
    T* ls = (T*)a.log_scale + i0;
    memcpy(v, sc.out_v, sizeof(T) * nq * a.D);
    for (int q = 0; q < nq; ++q)
      ls[q] = (T)((double)sc.out_lse[q] * 0.69314718055994530942 - pk.log_wsum);
  });
}

template <typename T>
static int forward_impl(const FieldArgs& a) {
  const PowerPlan<T> plan = field_plan<T>(a);
  return plan.enabled ? forward_run<T, true>(a, plan) : forward_run<T, false>(a, plan);
}

// Spins (then yields) until *flag > value; the acquire pairs with the release of the writer, so
// its dy/dw additions are visible afterwards.
static void wait_until_greater(const int64_t* flag, int64_t value) {
  for (int spins = 0; __atomic_load_n(flag, __ATOMIC_ACQUIRE) <= value; ++spins)
    if (spins > 64) sched_yield();
}

// Loads query tile t for the backward pass: x, g, softening, exclusion, lse2 and g.v - gl.
template <typename T>
static void load_backward_tile(BackwardScratch<T>& sc, const FieldArgs& a, const Packed<T>& pk,
                               const PowerPlan<T>& plan, int64_t i0, int nq) {
  const double log_wsum = pk.log_wsum;
  const int64_t D = a.D;
  const T* x = (const T*)a.x;
  const T* gv = (const T*)a.gv;
  const T* gl = (const T*)a.gl;
  const T* v = (const T*)a.v;
  const T* ls = (const T*)a.log_scale;
  const T* e2r = (const T*)a.eps2_rows;
  for (int q = 0; q < sc.QT; ++q) {
    const int64_t i = i0 + (q < nq ? q : nq - 1);
    memcpy(sc.xt + (int64_t)q * D, x + i * D, sizeof(T) * D);
    if (gv)
      memcpy(sc.gt + (int64_t)q * D, gv + i * D, sizeof(T) * D);
    else
      for (int64_t k = 0; k < D; ++k) sc.gt[(int64_t)q * D + k] = (T)0;
    sc.e2[q] = e2r ? e2r[i] : (T)a.eps2;
    sc.excl[q] = a.exclude ? a.exclude[i] : -1;
    const double lsi = (double)ls[i];
    const double lse2 = (lsi + log_wsum) * 1.4426950408889634074;
    sc.lse2[q] = lsi > -INFINITY ? (T)lse2 : (T)INFINITY;
    // power form: pi = (q / Q)^(p/2) with Q = 2^((lse2 - log2 w_max) / (p/2)) (power_form.h)
    sc.inv_q[q] = plan.enabled && lsi > -INFINITY
                      ? (T)exp2(-(lse2 - pk.log2_wmax) / plan.half_p) : (T)0;
    double gvv = 0.0;
    if (gv)
      for (int64_t k = 0; k < D; ++k) gvv += (double)gv[i * D + k] * (double)v[i * D + k];
    sc.delta[q] = (T)(gvv - (gl ? (double)gl[i] : 0.0));
  }
}

// Query tiles a thread sweeps together in the backward (backward_rows). Each charge tile's dy
// partials (D x CT) then come from L3 once per 8 query tiles rather than once per tile; the 8
// tiles' dx accumulators no longer stay in L2 instead, but a block reads and writes those once,
// outside C''s loop. Zen 4, N = B = 8192, D = 129, float32, one thread: 908-1037 ms with 1,
// 873-882 with 4, 835-841 with 8, no gain from 16 or 32 (docs/performance.md, "Eight query
// tiles a sweep").
constexpr int kSweptRows = 8;

// Number of row groups with private dy/dw partial sums: as many as fit a 64 MiB budget, at most
// 8 and at most one per query tile. It depends on the problem's sizes only, never on the number
// of threads, so the sums below have the same grouping (and bits) at any thread count. Fewer,
// smaller partials cost less to zero, stream and add: at N = B = 8192, D = 129 on 2 threads the
// backward took 303 ms with 4 groups against 342 ms with 16 (the previous cap, 256 MiB).
template <typename T>
static int64_t backward_groups(int64_t I, int64_t D, int64_t Bp, bool need_y, bool need_w) {
  if (!need_y && !need_w) return I;  // rows are independent: no partials needed
  const int64_t per_group = (int64_t)sizeof(T) * ((need_y ? D : 0) + 1) * Bp;
  int64_t g = (int64_t)(64 << 20) / (per_group > 0 ? per_group : 1);
  if (g > 8) g = 8;
  if (g > I) g = I;
  return g < 1 ? 1 : g;
}

// One thread's sweep of query tiles [r0, r1) against every charge tile, `rows` query tiles at
// a time (one scratch each): each charge tile's item runs for the rows in turn, so that tile's
// dy and dw partials come from L3 into L2 once for all of them rather than once per row (the
// dy partials of a row group are 4.3 MB at N = B = 8192, D = 129: docs/performance.md, "The
// backward"). A row still adds to every partial after the row before it, so every sum has the
// same order, and the same bits, as one row at a time. With `progress` (the single-group
// fallback; rows must then be 1) row i adds to charge tile j only after row i - 1 has.
template <typename T>
static void backward_rows(BackwardScratch<T>* scs, int rows, const FieldArgs& a,
                          const Packed<T>& pk, const PowerPlan<T>& plan, int64_t r0, int64_t r1,
                          int64_t step, T* dyT, T* gwT, int64_t* progress) {
  const int64_t N = a.N, D = a.D;
  constexpr int W = VecTraits<T>::W;
  const int QT = scs[0].QT, CT = scs[0].CT;
  const int64_t J = (pk.Bp + CT - 1) / CT;
  const bool need_x = a.gx != nullptr, need_y = a.gy != nullptr, need_w = a.gw != nullptr;
  const T half_p = (T)(0.5 * a.power);
  T* gx = (T*)a.gx;
  for (int64_t i = r0; i < r1; i += step * rows) {
    int nr = 0;
    int nq[kSweptRows];
    for (; nr < rows && i + nr * step < r1; ++nr) {
      const int64_t i0 = (i + nr * step) * QT;
      nq[nr] = (int)(N - i0 < QT ? N - i0 : QT);
      load_backward_tile<T>(scs[nr], a, pk, plan, i0, nq[nr]);
      if (need_x) memset(scs[nr].accdx, 0, sizeof(T) * (size_t)(QT * D * W));
    }
    for (int64_t j = 0; j < J; ++j)
      for (int r = 0; r < nr; ++r) {
        const int64_t row = i + r * step;
        if (progress && row > 0) wait_until_greater(&progress[row - 1], j);
        backward_item<T>(scs[r], pk, plan, j * CT, half_p, a.gv != nullptr, need_x, need_y,
                         need_w, dyT, gwT, nq[r], r == 0);
        if (progress) __atomic_store_n(&progress[row], j + 1, __ATOMIC_RELEASE);
      }
    if (need_x)
      for (int r = 0; r < nr; ++r) {
        const int64_t i0 = (i + r * step) * QT;
        for (int q = 0; q < nq[r]; ++q) {
          const T* acc = scs[r].accdx + (int64_t)q * D * W;
          T* sums = scs[r].dx_sums;
          int64_t k = 0;
          for (; k + W <= D; k += W) vhsum_block<T>(acc + k * W, sums + k);
          for (; k < D; ++k) sums[k] = vhsum<T>(vload<T>(acc + k * W));
          for (k = 0; k < D; ++k) gx[(i0 + q) * D + k] += sums[k];
        }
      }
  }
}

template <typename T>
static int backward_impl(const FieldArgs& a) {
  const int64_t N = a.N, D = a.D, B = a.B;
  const bool need_x = a.gx != nullptr, need_y = a.gy != nullptr, need_w = a.gw != nullptr;
  // query tiles: multiples of phase A' and C' blocks (4 queries, or 2)
  const TileShape<T> shape = tile_shape<T>(D, 4);
  // The power form recomputes pi without a log or an exp (power_form.h); dL/dw needs pi / w_j,
  // which the log domain gives finite at w_j = 0, so calls that ask for it stay there.
  const PowerPlan<T> plan = need_w ? PowerPlan<T>{} : field_plan<T>(a);
  Packed<T> pk;
  if (!pk.allocate(B, D, shape.CT)) {
    pk.release();
    return 1;
  }
  pack_weights<T>((const T*)a.w, pk, plan);
  const int64_t I = (N + shape.QT - 1) / shape.QT;
  // Rows (query tiles) are split into G contiguous groups; each group sums dy and dw into its
  // own partial buffers, a thread takes a whole group (no waiting), and the partials are added
  // in group order at the end. When memory allows only one group, threads share it through a
  // row pipeline that keeps the same order (row i adds to tile j after row i - 1 has).
  const int64_t G = backward_groups<T>(I, D, pk.Bp, need_y, need_w);
  const bool partials = (need_y || need_w) && G > 1;
  const int64_t ny = need_y ? D * pk.Bp : 0, nw = need_w ? pk.Bp : 0;
  const int64_t copies = partials ? G : 1;
  T* dyT = need_y ? (T*)aligned_buffer(sizeof(T) * (size_t)(copies * ny)) : nullptr;
  T* gwT = need_w ? (T*)aligned_buffer(sizeof(T) * (size_t)(copies * nw)) : nullptr;
  int64_t* progress = (int64_t*)aligned_buffer(sizeof(int64_t) * (size_t)(I > 0 ? I : 1));
  if ((need_y && !dyT) || (need_w && !gwT) || !progress) {
    free(dyT); free(gwT); free(progress); pk.release();
    return 1;
  }
  for (int64_t i = 0; i < I; ++i) progress[i] = 0;
  T* gx = (T*)a.gx;
  T* gy = (T*)a.gy;
  int failed = 0;
  // One parallel region: packing and zeroing (work-sharing loops), the sweep, then the sums of
  // the groups' partials and the scatter of dy back to (B, D) rows.
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    pack_charge_tiles<T>((const T*)a.y, pk);
#pragma omp for schedule(static) nowait
    for (int64_t e = 0; e < copies * ny; ++e) dyT[e] = (T)0;
#pragma omp for schedule(static) nowait
    for (int64_t e = 0; e < copies * nw; ++e) gwT[e] = (T)0;
    if (need_x) {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < N; ++i) {
        if (a.gv) memcpy(gx + i * D, (const T*)a.gv + i * D, sizeof(T) * (size_t)D);
        else memset(gx + i * D, 0, sizeof(T) * (size_t)D);
      }
    }
#pragma omp barrier  // packing and zeroing done before the sweep
    BackwardScratch<T> scs[kSweptRows];
    const bool ok = scs[0].allocate(shape, D);
    if (!ok) failed = 1;
    const bool pipeline = (need_y || need_w) && !partials;  // the single-group fallback
    // Query tiles swept together (backward_rows): only where there are dy partials to keep in
    // L2 and the row order allows it (not the pipeline), at most a group's rows; a scratch that
    // cannot be allocated only means fewer.
    const int64_t group_rows = (I + G - 1) / G;
    int rows = 1;
    while (ok && !pipeline && need_y && rows < kSweptRows && rows < group_rows &&
           scs[rows].allocate(shape, D, &scs[0]))
      ++rows;
    for (int r = 0; r < rows; ++r) scs[r].embed = a.broadcasts == 2;
    if (!pipeline) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < G; ++g) {
        if (!ok) continue;
        const int64_t r0 = g * I / G, r1 = (g + 1) * I / G;
        backward_rows<T>(scs, rows, a, pk, plan, r0, r1, 1,
                         dyT ? dyT + (partials ? g * ny : 0) : nullptr,
                         gwT ? gwT + (partials ? g * nw : 0) : nullptr, nullptr);
      }
    } else {
      if (ok) {
        backward_rows<T>(scs, 1, a, pk, plan, tid, I, nth, dyT, gwT, progress);
      } else {
        // keep the pipeline moving for the other threads: mark this thread's rows as done
        for (int64_t i = tid; i < I; i += nth)
          __atomic_store_n(&progress[i], (int64_t)1 << 62, __ATOMIC_RELEASE);
      }
#pragma omp barrier
    }
    for (BackwardScratch<T>& sc : scs) sc.release();
    if (partials) {  // add the groups' partial sums, every element in group order
#pragma omp for schedule(static)
      for (int64_t e = 0; e < ny; ++e) {
        T acc = dyT[e];
        for (int64_t g = 1; g < G; ++g) acc += dyT[g * ny + e];
        dyT[e] = acc;
      }
#pragma omp single
      for (int64_t e = 0; e < nw; ++e)
        for (int64_t g = 1; g < G; ++g) gwT[e] += gwT[g * nw + e];
    }
    if (need_y) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < B; ++j)
        for (int64_t k = 0; k < D; ++k) gy[j * D + k] = dyT[pk.index(k, j)];
    }
  }
  free(progress);
  if (need_w) {
    // dL/dw_j = sum_i (pi_ij / w_j) h_ij - sum_i gl_i / sum_k w_k
    double glsum = 0.0;
    if (a.gl)
      for (int64_t i = 0; i < N; ++i) glsum += (double)((const T*)a.gl)[i];
    const double corr = glsum / exp(pk.log_wsum);
    T* gw = (T*)a.gw;
    for (int64_t j = 0; j < B; ++j) gw[j] = (T)((double)gwT[j] - corr);
  }
  free(dyT);
  free(gwT);
  pk.release();
  return failed;
}

int field_backward(const FieldArgs& a) {
  return a.is_double ? backward_impl<double>(a) : backward_impl<float>(a);
}

// Whole trajectories of one tile of queries: every step and every RK4 stage runs here, so the
// state is read from memory once and written once (queries never interact: the charges are
// fixed). Each stage is one field_tile call with the stage's heights as softening; the tableau,
// the heights and the updates are common/field_numerics.h's (shared with the CUDA kernels).
// xs holds the state, ks the running slope combination, sc.xt the next stage's input.
template <typename T, bool kPower>
static void flow_tile(TileScratch<T>& sc, const Packed<T>& pk, const PowerPlan<T>& plan,
                      const FieldArgs& a, T half_p, int64_t i0, int nq, T* xs, T* ks) {
  const int QT = sc.QT;
  const int64_t D = a.D;
  const T* x = (const T*)a.x;
  for (int q = 0; q < QT; ++q) {
    const int64_t i = i0 + (q < nq ? q : nq - 1);
    memcpy(xs + (int64_t)q * D, x + i * D, sizeof(T) * D);
    sc.excl[q] = (a.exclude && q < nq) ? a.exclude[i] : -1;
  }
  auto row = [&](int q) { return i0 + (q < nq ? q : nq - 1); };
  auto set_heights = [&](double c, int64_t step) {
    for (int q = 0; q < QT; ++q) {
      const int64_t i = row(q);
      sc.e2[q] = (T)stage_height2(a.t0[i], a.dt[i], step, c);
    }
  };
  typedef ScalarMath<T> SM;
  const int64_t n = (int64_t)QT * D;
  const int n_stages = a.solver == 1 ? kRk4Stages : 1;
  for (int64_t step = 0; step < a.n_steps; ++step) {
    memcpy(sc.xt, xs, sizeof(T) * n);  // the first stage's input is the state
    for (int stage = 0; stage < n_stages; ++stage) {
      set_heights(n_stages == 1 ? 0.0 : rk4_c(stage), step);
      field_tile<T, kPower>(sc, pk, half_p, QT, plan);
      for (int q = 0; q < QT; ++q) {
        const T h = (T)a.dt[row(q)];
        const T* vq = sc.out_v + (int64_t)q * D;
        T* xq = xs + (int64_t)q * D;
        if (n_stages == 1) {
          for (int64_t k = 0; k < D; ++k) xq[k] = euler_update<SM>(xq[k], vq[k], h);
          continue;
        }
        T* kq = ks + (int64_t)q * D;
        T* xin = sc.xt + (int64_t)q * D;
        for (int64_t k = 0; k < D; ++k)
          xin[k] = rk4_stage_update<SM>(stage, vq[k], h, xq[k], kq[k]);
      }
    }
  }
  T* out = (T*)a.x_out;
  memcpy(out + i0 * D, xs, sizeof(T) * (size_t)nq * D);
}

template <typename T, bool kPower>
static int flow_run(const FieldArgs& a, const PowerPlan<T>& plan) {
  const T half_p = (T)(0.5 * a.power);
  return sweep_query_tiles<T, true>(a, plan, [&](TileScratch<T>& sc, const Packed<T>& pk,
                                                 int64_t i0, int nq, T* xs, T* ks) {
    flow_tile<T, kPower>(sc, pk, plan, a, half_p, i0, nq, xs, ks);
  });
}

// The flow's range bound for the power form: the largest height z_max = exp(max t) over every
// step, and queries that stay within 4 z_max of where they started (a point that climbs to
// height z ends within about z of the charges: docs/DESIGN.md, "The flow"); the plan's margin
// (q >= 1e-30 in float32, normal down to 1e-38) absorbs the rest.
template <typename T>
static int flow_impl(const FieldArgs& a) {
  double t_max = -INFINITY;
  for (int64_t i = 0; i < a.N; ++i) {
    const double t_end = a.t0[i] + (double)a.n_steps * a.dt[i];
    t_max = fmax(t_max, fmax(a.t0[i], t_end));
  }
  const double z_max = exp(t_max);
  const PowerPlan<T> plan =
      call_plan<T>(a, max_abs<T>((const T*)a.x, a.N * a.D) + 4.0 * z_max, z_max * z_max);
  return plan.enabled ? flow_run<T, true>(a, plan) : flow_run<T, false>(a, plan);
}

int flow_steps(const FieldArgs& a) {
  return a.is_double ? flow_impl<double>(a) : flow_impl<float>(a);
}

int field_forward(const FieldArgs& a) {
  return a.is_double ? forward_impl<double>(a) : forward_impl<float>(a);
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
