// CPU kernels of the Poisson field, compiled once per instruction set (CMakeLists.txt passes
// -DPF_ISA_NS=... and the matching -m flags). dispatch.cpp picks a copy at run time.
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include "kernel_args.h"
#include "field_backward.h"
#include "field_tile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace poissonflow {
namespace PF_ISA_NS {

template <typename T>
static int forward_impl(const FieldArgs& a) {
  const TileShape<T> shape = tile_shape<T>(a.D);
  Packed<T> pk;
  if (!pk.allocate(a.B, a.D, shape.CT)) return 1;
  pack_charges<T>((const T*)a.y, (const T*)a.w, pk, a.num_threads);
  const int QT = shape.QT;
  const int64_t ntiles = (a.N + QT - 1) / QT;
  const T half_p = (T)(0.5 * a.power);
  int failed = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    TileScratch<T> sc;
    if (!sc.allocate(shape, a.D)) {
      failed = 1;
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t i0 = t * QT;
        const int nq = (int)(a.N - i0 < QT ? a.N - i0 : QT);
        load_query_tile<T>(sc, a, i0, nq);
        field_tile<T>(sc, pk, half_p, nq);
        T* v = (T*)a.v + i0 * a.D;
        T* ls = (T*)a.log_scale + i0;
        memcpy(v, sc.out_v, sizeof(T) * nq * a.D);
        for (int q = 0; q < nq; ++q)
          ls[q] = (T)((double)sc.out_lse[q] * 0.69314718055994530942 - pk.log_wsum);
      }
    }
    sc.release();
  }
  pk.release();
  return failed;
}

// Spins (then yields) until *flag > value; the acquire pairs with the release of the writer, so
// its dy/dw additions are visible afterwards.
static void wait_until_greater(const int64_t* flag, int64_t value) {
  for (int spins = 0; __atomic_load_n(flag, __ATOMIC_ACQUIRE) <= value; ++spins)
    if (spins > 64) sched_yield();
}

// Loads query tile t for the backward pass: x, g, softening, exclusion, lse2 and g.v - gl.
template <typename T>
static void load_backward_tile(BackwardScratch<T>& sc, const FieldBackwardArgs& b,
                               double log_wsum, int64_t i0, int nq) {
  const FieldArgs& a = b.fwd;
  const int64_t D = a.D;
  const T* x = (const T*)a.x;
  const T* gv = (const T*)b.gv;
  const T* gl = (const T*)b.gl;
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
    sc.lse2[q] = lsi > -INFINITY ? (T)((lsi + log_wsum) * 1.4426950408889634074) : (T)INFINITY;
    double gvv = 0.0;
    if (gv)
      for (int64_t k = 0; k < D; ++k) gvv += (double)gv[i * D + k] * (double)v[i * D + k];
    sc.delta[q] = (T)(gvv - (gl ? (double)gl[i] : 0.0));
  }
}

// Number of row groups with private dy/dw partial sums: as many as fit a 256 MiB budget, at most
// 16 and at most one per query tile. It depends on the problem's sizes only, never on the number
// of threads, so the sums below have the same grouping (and bits) at any thread count.
template <typename T>
static int64_t backward_groups(int64_t I, int64_t D, int64_t Bp, bool need_y, bool need_w) {
  if (!need_y && !need_w) return I;  // rows are independent: no partials needed
  const int64_t per_group = (int64_t)sizeof(T) * ((need_y ? D : 0) + 1) * Bp;
  int64_t g = (int64_t)(256 << 20) / (per_group > 0 ? per_group : 1);
  if (g > 16) g = 16;
  if (g > I) g = I;
  return g < 1 ? 1 : g;
}

// One thread's sweep of query tiles [r0, r1) against every charge tile. With `progress` (the
// single-group fallback) row i adds to charge tile j only after row i - 1 has.
template <typename T>
static void backward_rows(BackwardScratch<T>& sc, const FieldBackwardArgs& b, const Packed<T>& pk,
                          int64_t r0, int64_t r1, int64_t step, T* dyT, T* gwT,
                          int64_t* progress) {
  const FieldArgs& a = b.fwd;
  const int64_t N = a.N, D = a.D;
  constexpr int W = VecTraits<T>::W;
  const int QT = sc.QT, CT = sc.CT;
  const int64_t J = (pk.Bp + CT - 1) / CT;
  const bool need_x = b.gx != nullptr, need_y = b.gy != nullptr, need_w = b.gw != nullptr;
  const T half_p = (T)(0.5 * a.power);
  T* gx = (T*)b.gx;
  for (int64_t i = r0; i < r1; i += step) {
    const int64_t i0 = i * QT;
    const int nq = (int)(N - i0 < QT ? N - i0 : QT);
    load_backward_tile<T>(sc, b, pk.log_wsum, i0, nq);
    if (need_x) memset(sc.accdx, 0, sizeof(T) * (size_t)(QT * D * W));
    for (int64_t j = 0; j < J; ++j) {
      if (progress && i > 0) wait_until_greater(&progress[i - 1], j);
      backward_item<T>(sc, pk, j * CT, half_p, b.gv != nullptr, need_x, need_y, need_w, dyT,
                       gwT, nq);
      if (progress) __atomic_store_n(&progress[i], j + 1, __ATOMIC_RELEASE);
    }
    if (need_x)
      for (int q = 0; q < nq; ++q)
        for (int64_t k = 0; k < D; ++k)
          gx[(i0 + q) * D + k] += vhsum<T>(vload<T>(sc.accdx + ((int64_t)q * D + k) * W));
  }
}

template <typename T>
static int backward_impl(const FieldBackwardArgs& b) {
  const FieldArgs& a = b.fwd;
  const int64_t N = a.N, D = a.D, B = a.B;
  const bool need_x = b.gx != nullptr, need_y = b.gy != nullptr, need_w = b.gw != nullptr;
  const TileShape<T> shape = tile_shape<T>(D);
  Packed<T> pk;
  if (!pk.allocate(B, D, shape.CT)) return 1;
  pack_charges<T>((const T*)a.y, (const T*)a.w, pk, a.num_threads);
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
  if (dyT) memset(dyT, 0, sizeof(T) * (size_t)(copies * ny));
  if (gwT) memset(gwT, 0, sizeof(T) * (size_t)(copies * nw));
  for (int64_t i = 0; i < I; ++i) progress[i] = 0;
  T* gx = (T*)b.gx;
  if (need_x) {
    if (b.gv) memcpy(gx, b.gv, sizeof(T) * (size_t)(N * D));
    else memset(gx, 0, sizeof(T) * (size_t)(N * D));
  }
  int failed = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    BackwardScratch<T> sc;
    const bool ok = sc.allocate(shape, D);
    if (!ok) failed = 1;
    if (partials || !(need_y || need_w)) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < G; ++g) {
        if (!ok) continue;
        const int64_t r0 = g * I / G, r1 = (g + 1) * I / G;
        backward_rows<T>(sc, b, pk, r0, r1, 1, dyT ? dyT + (partials ? g * ny : 0) : nullptr,
                         gwT ? gwT + (partials ? g * nw : 0) : nullptr, nullptr);
      }
    } else if (ok) {
      backward_rows<T>(sc, b, pk, tid, I, nth, dyT, gwT, progress);
    } else {
      // keep the pipeline moving for the other threads: mark this thread's rows as done
      for (int64_t i = tid; i < I; i += nth) __atomic_store_n(&progress[i], (int64_t)1 << 62,
                                                              __ATOMIC_RELEASE);
    }
    sc.release();
  }
  free(progress);
  if (partials) {  // add the groups' partial sums, every element in group order
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t e = 0; e < ny; ++e) {
      T acc = dyT[e];
      for (int64_t g = 1; g < G; ++g) acc += dyT[g * ny + e];
      dyT[e] = acc;
    }
    for (int64_t e = 0; e < nw; ++e)
      for (int64_t g = 1; g < G; ++g) gwT[e] += gwT[g * nw + e];
  }
  if (need_y) {
    T* gy = (T*)b.gy;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t j = 0; j < B; ++j)
      for (int64_t k = 0; k < D; ++k) gy[j * D + k] = dyT[pk.index(k, j)];
  }
  if (need_w) {
    // dL/dw_j = sum_i (pi_ij / w_j) h_ij - sum_i gl_i / sum_k w_k
    double glsum = 0.0;
    if (b.gl)
      for (int64_t i = 0; i < N; ++i) glsum += (double)((const T*)b.gl)[i];
    const double corr = glsum / exp(pk.log_wsum);
    T* gw = (T*)b.gw;
    for (int64_t j = 0; j < B; ++j) gw[j] = (T)((double)gwT[j] - corr);
  }
  free(dyT);
  free(gwT);
  pk.release();
  return failed;
}

int field_backward(const FieldBackwardArgs& b) {
  return b.fwd.is_double ? backward_impl<double>(b) : backward_impl<float>(b);
}

// Whole trajectories of one tile of queries: every step and every RK4 stage runs here, so the
// state is read from memory once and written once (queries never interact: the charges are
// fixed). Each stage is one field_tile call with the stage's heights as softening.
template <typename T>
static void flow_tile(TileScratch<T>& sc, const Packed<T>& pk, const FlowArgs& f, T half_p,
                      int64_t i0, int nq, T* xs, T* ks) {
  const FieldArgs& a = f.field;
  const int QT = sc.QT;
  const int64_t D = a.D;
  const T* x = (const T*)a.x;
  for (int q = 0; q < QT; ++q) {
    const int64_t i = i0 + (q < nq ? q : nq - 1);
    memcpy(xs + (int64_t)q * D, x + i * D, sizeof(T) * D);
    sc.excl[q] = (a.exclude && q < nq) ? a.exclude[i] : -1;
  }
  auto row = [&](int q) { return i0 + (q < nq ? q : nq - 1); };
  auto set_heights = [&](double frac, int64_t step) {
    for (int q = 0; q < QT; ++q) {
      const int64_t i = row(q);
      const double t = f.t0[i] + ((double)step + frac) * f.dt[i];
      sc.e2[q] = (T)exp(2.0 * t);
    }
  };
  const int64_t n = (int64_t)QT * D;
  for (int64_t step = 0; step < f.n_steps; ++step) {
    if (f.solver == 0) {  // Euler: x += dt v(x, t)
      memcpy(sc.xt, xs, sizeof(T) * n);
      set_heights(0.0, step);
      field_tile<T>(sc, pk, half_p, QT);
      for (int q = 0; q < QT; ++q) {
        const T h = (T)f.dt[row(q)];
        for (int64_t k = 0; k < D; ++k) xs[q * D + k] += h * sc.out_v[q * D + k];
      }
      continue;
    }
    // Classic RK4: k1 at (x, t), k2 at (x + h/2 k1, t + h/2), k3 at (x + h/2 k2, t + h/2),
    // k4 at (x + h k3, t + h); x += h/6 (k1 + 2 k2 + 2 k3 + k4).
    static const double kNext[3] = {0.5, 0.5, 1.0};   // offset of the next stage's input
    static const double kWeight[4] = {1.0, 2.0, 2.0, 1.0};
    static const double kTime[4] = {0.0, 0.5, 0.5, 1.0};
    memcpy(sc.xt, xs, sizeof(T) * n);
    for (int stage = 0; stage < 4; ++stage) {
      set_heights(kTime[stage], step);
      field_tile<T>(sc, pk, half_p, QT);
      for (int q = 0; q < QT; ++q) {
        const T h = (T)f.dt[row(q)];
        const T wgt = (T)kWeight[stage];
        T* kq = ks + (int64_t)q * D;
        const T* vq = sc.out_v + (int64_t)q * D;
        if (stage == 0)
          for (int64_t k = 0; k < D; ++k) kq[k] = vq[k];
        else
          for (int64_t k = 0; k < D; ++k) kq[k] += wgt * vq[k];
        if (stage < 3) {
          const T off = (T)kNext[stage] * h;
          const T* xq = xs + (int64_t)q * D;
          T* xin = sc.xt + (int64_t)q * D;
          for (int64_t k = 0; k < D; ++k) xin[k] = xq[k] + off * vq[k];
        }
      }
    }
    for (int q = 0; q < QT; ++q) {
      const T h6 = (T)(f.dt[row(q)] / 6.0);
      for (int64_t k = 0; k < D; ++k) xs[q * D + k] += h6 * ks[q * D + k];
    }
  }
  T* out = (T*)f.x_out;
  memcpy(out + i0 * D, xs, sizeof(T) * (size_t)nq * D);
}

template <typename T>
static int flow_impl(const FlowArgs& f) {
  const FieldArgs& a = f.field;
  const TileShape<T> shape = tile_shape<T>(a.D);
  Packed<T> pk;
  if (!pk.allocate(a.B, a.D, shape.CT)) return 1;
  pack_charges<T>((const T*)a.y, (const T*)a.w, pk, a.num_threads);
  const int QT = shape.QT;
  const int64_t ntiles = (a.N + QT - 1) / QT;
  const T half_p = (T)(0.5 * a.power);
  int failed = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    TileScratch<T> sc;
    T* xs = (T*)aligned_buffer(sizeof(T) * QT * a.D);
    T* ks = (T*)aligned_buffer(sizeof(T) * QT * a.D);
    if (!sc.allocate(shape, a.D) || !xs || !ks) {
      failed = 1;
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t i0 = t * QT;
        const int nq = (int)(a.N - i0 < QT ? a.N - i0 : QT);
        flow_tile<T>(sc, pk, f, half_p, i0, nq, xs, ks);
      }
    }
    free(xs);
    free(ks);
    sc.release();
  }
  pk.release();
  return failed;
}

int flow_steps(const FlowArgs& f) {
  return f.field.is_double ? flow_impl<double>(f) : flow_impl<float>(f);
}

int field_forward(const FieldArgs& a) {
  return a.is_double ? forward_impl<double>(a) : forward_impl<float>(a);
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
