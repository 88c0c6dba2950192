// The work of one thread block of the CUDA field kernels, written once for two executors:
//   DeviceExec (field_kernels.cuh): each(f) runs f(threadIdx.x), sync() is __syncthreads();
//   HostExec (emulate/field_emulate.cpp): each(f) runs f(t) for t = 0..255 in a chosen order,
//   sync() does nothing, and per-thread registers live in an array of ThreadState.
// So the emulator executes this very code, phase by phase, on the CPU.
//
// Rules that keep the two executions equivalent (and that the emulator checks as far as it can,
// by running the threads of every phase in different orders and asking for identical results):
//   * threads talk only through shared memory, and a value written in one each() is read by
//     another thread only after a sync(): no warp shuffles, no atomics, no shared-memory races;
//   * control flow around each()/sync() is uniform over the block.
// What the emulator cannot see: real concurrency (a missing sync() between two each() calls that
// conflict), bank conflicts, register spills and launch limits. The kernels' per-row reductions
// therefore go through shared memory in a fixed order, which also makes results bit-identical
// from run to run.
//
// Geometry and the shared-memory layout: block_plan.h. Arithmetic: field_math.cuh on top of
// common/field_numerics.h (the formulas shared with the CPU kernels).
//
// The program, one function per phase (run_block at the end puts them together):
//   init_block     own rows' scalars, own tiles, zero accumulators
//   sweep          for every tile of other rows:
//     distances      phase A over D in window-sized chunks (phase_a: one loop for every mode)
//     softmax_tile   forward/flow: scores, lazy online-softmax update, probabilities, phase C
//     gradient_tile  backward: pair gradient terms, dL/dw partial sums, phase C
//   write_outputs  v and lse2, dL/dx, or dL/dy and sum_i gs / w
//   flow_block     the fused flow: one sweep per step and stage, Euler / RK4 update epilogue
// Each mode is a compile-time parameter (ModeTraits), so every inner loop stays straight-line.
#pragma once

#include <stdint.h>
#include <string.h>

#include "block_plan.h"
#include "field_math.cuh"

namespace poissonflow {
namespace cuda {

// Typed view of LaunchArgs.
template <typename T>
struct Params {
  const T* x;  // query rows (N, ld); for the flow the in/out state (then also `state`)
  const T* y;  // charge rows (B, ld)
  const T* w;
  const int64_t* exclude;
  const T* eps_rows;
  T* v;
  T* lse2;
  const T* gv;
  const T* lse2_in;
  const T* delta;
  const T* gl;
  T* gx;
  T* gy;
  T* gwsum;
  const double* t0;  // flow times in float64, as on the CPU (t0 + step dt keeps its bits)
  const double* dt;
  T* comb;
  T* state;
  int64_t N, B, D, ld, n_steps;
  T eps2, power, half_p, tiny;
  int solver;
};

template <typename T>
inline Params<T> typed_params(const LaunchArgs& a) {
  Params<T> p;
  p.x = (const T*)a.x;
  p.y = (const T*)a.y;
  p.w = (const T*)a.w;
  p.exclude = (const int64_t*)a.exclude;
  p.eps_rows = (const T*)a.eps_rows;
  p.v = (T*)a.v;
  p.lse2 = (T*)a.lse2;
  p.gv = (const T*)a.gv;
  p.lse2_in = (const T*)a.lse2_in;
  p.delta = (const T*)a.delta;
  p.gl = (const T*)a.gl;
  p.gx = (T*)a.gx;
  p.gy = (T*)a.gy;
  p.gwsum = (T*)a.gwsum;
  p.t0 = (const double*)a.t0;
  p.dt = (const double*)a.dt;
  p.comb = (T*)a.comb;
  p.state = (T*)a.x;
  p.N = a.N;
  p.B = a.B;
  p.D = a.D;
  p.ld = a.ld;
  p.n_steps = a.n_steps;
  p.eps2 = (T)a.eps2;
  p.power = (T)a.power;
  p.half_p = (T)(0.5 * a.power);
  p.tiny = (T)numerics::r2_floor(a.input_dtype);  // the input dtype's floor (field_numerics.h)
  p.solver = a.solver;
  return p;
}

template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

template <typename T>
PF_DEV Pack<T> ld16(const T* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const Pack<T>*>(p);
#else
  Pack<T> r;
  memcpy(&r, p, sizeof(r));
  return r;
#endif
}

template <typename T>
PF_DEV void st16(T* p, const Pack<T>& v) {
#if defined(__CUDACC__)
  *reinterpret_cast<Pack<T>*>(p) = v;
#else
  memcpy(p, &v, sizeof(v));
#endif
}

template <typename T>
PF_DEV Pack<T> zero_pack() {
  Pack<T> r;
#pragma unroll
  for (int e = 0; e < (int)(16 / sizeof(T)); ++e) r.v[e] = (T)0;
  return r;
}

// TM = 4 consecutive values (rows r0..r0+3 of a coefficient tile, or of a row array).
template <typename T>
PF_DEV void load_tm(const T* p, T out[4]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int h = 0; h < 4 / V; ++h) {
    const Pack<T> pk = ld16(p + h * V);
#pragma unroll
    for (int e = 0; e < V; ++e) out[h * V + e] = pk.v[e];
  }
}

// Pointers into the block's shared memory (layout: block_plan.h smem_layout).
template <typename T>
struct Tiles {
  T* own;     // BR own rows, current window or chunk (pack-major, see pack_at)
  T* other;   // BO other rows
  T* g;       // BR or BO upstream-gradient rows of the query side (backward)
  T* coef;    // (BO, kLdp) pair coefficients, other-major
  T* coef2;   // (BO, kLdp) second coefficient (dL/dy: pi)
  T* red;     // (BR, kLanes + 1) per-row partials of phase A threads
  T* rows_own;
  T* rows_oth;
  int64_t* excl_own;
  int64_t* excl_oth;

  PF_DEV Tiles(unsigned char* base, const Plan& p)
      : own((T*)(base + p.off_own)),
        other((T*)(base + p.off_other)),
        g((T*)(base + p.off_g)),
        coef((T*)(base + p.off_coef)),
        coef2((T*)(base + p.off_coef2)),
        red((T*)(base + p.off_red)),
        rows_own((T*)(base + p.off_rows_own)),
        rows_oth((T*)(base + p.off_rows_other)),
        excl_own((int64_t*)(base + p.off_excl_own)),
        excl_oth((int64_t*)(base + p.off_excl_other)) {}
  PF_DEV T& ro(int array, int r) const { return rows_own[array * Geo<T>::BR + r]; }
  PF_DEV T& rt(int array, int o) const { return rows_oth[array * Geo<T>::BO + o]; }
};

constexpr int kRedStride = 17;  // Geo::kLanes + 1: conflict-free row reads of the partials

// Registers of one thread that live across phases.
template <typename T, int UPT>
struct ThreadState {
  T ra[Geo<T>::AR][Geo<T>::AO];  // phase A: r2, then the pair scores
  T ga[Geo<T>::AR][Geo<T>::AO];  // phase A: g . (x - y) (backward)
  T acc[UPT][Geo<T>::TM][Geo<T>::TN];
};

// Staged tiles are pack-major: the 16-byte pack `pk` (dimensions pk * kVec ...) of row r of a
// tile of R rows is pack number pk * (R + 1) + r. Both inner loops then step by compile-time
// strides (next row: one pack; next pack: R + 1 packs), so they need no address arithmetic, and
// the odd stride R + 1 keeps phase C's lanes (one pack each) on distinct banks.
template <typename T, int R>
PF_DEV T* pack_at(T* tile, int r, int pk) {
  return tile + ((int64_t)pk * (R + 1) + r) * Geo<T>::kVec;
}

// Copies rows [row0, row0 + R) x dims [k0, k0 + klen) of `src` (row stride ld) into the tile
// `dst`. Rows at or past `nvalid` and dims at or past ld become zeros, so padding contributes
// exactly 0 to every difference. Consecutive threads read consecutive packs of a row.
template <typename T, int R>
PF_DEV void stage_rows(int tid, T* dst, const T* src, int64_t row0, int nvalid, int64_t ld,
                       int64_t k0, int64_t klen) {
  typedef Geo<T> G;
  const int packs = (int)(klen / G::kVec);
  const int items = R * packs;
  for (int it = tid; it < items; it += G::kThreads) {
    const int r = it / packs;
    const int pk = it - r * packs;
    const int64_t k = k0 + (int64_t)pk * G::kVec;
    Pack<T> val = zero_pack<T>();
    if (r < nvalid && k < ld) val = ld16(src + (row0 + r) * ld + k);
    st16(pack_at<T, R>(dst, r, pk), val);
  }
}

// What each mode's block program does, decided at compile time.
template <int M>
struct ModeTraits {
  static constexpr bool kOwnIsQuery = M != kBackwardY;  // dL/dy: own rows are the charges
  static constexpr bool kSoftmax = M == kForward || M == kFlow;
  static constexpr bool kGrad = M == kBackwardX || M == kBackwardY;  // phase A sums g . (x - y)
  static constexpr bool kGradOnOwn = M == kBackwardX;  // g rows are staged with the query side
};

// Phase A over one staged chunk of `klen` dimensions: r2 (and, in the backward, g . (x - y)) by
// direct differences, AR x AO pairs per thread. The difference is always x - y, whichever side
// the queries are on, so every mode forms bit-identical r2 (the backward recomputes pi from the
// forward's log-sum-exp).
template <typename T, int UPT, int M>
PF_DEV void phase_a(int tid, const Tiles<T>& sm, int64_t klen, ThreadState<T, UPT>& ts) {
  typedef Geo<T> G;
  typedef ModeTraits<M> MT;
  constexpr int V = G::kVec;
  constexpr int kOwnStride = (G::BR + 1) * V, kOthStride = (G::BO + 1) * V;
  constexpr int kGRows = MT::kGradOnOwn ? G::AR : G::AO;
  constexpr int kGStride = MT::kGradOnOwn ? kOwnStride : kOthStride;
  const int tr = tid / G::kLanes, to = tid % G::kLanes;
  const int packs = (int)(klen / V);
  const T* xp = pack_at<T, G::BR>(sm.own, tr, 0);
  const T* yp = pack_at<T, G::BO>(sm.other, to, 0);
  const T* gp = MT::kGradOnOwn ? pack_at<T, G::BR>(sm.g, tr, 0) : pack_at<T, G::BO>(sm.g, to, 0);
#pragma unroll 2
  for (int p = 0; p < packs; ++p, xp += kOwnStride, yp += kOthStride, gp += kGStride) {
    Pack<T> xo[G::AR], yo[G::AO], go[kGRows];
#pragma unroll
    for (int i = 0; i < G::AR; ++i) xo[i] = ld16(xp + G::kLanes * i * V);
#pragma unroll
    for (int j = 0; j < G::AO; ++j) yo[j] = ld16(yp + G::kLanes * j * V);
    if constexpr (MT::kGrad) {
#pragma unroll
      for (int g = 0; g < kGRows; ++g) go[g] = ld16(gp + G::kLanes * g * V);
    }
#pragma unroll
    for (int e = 0; e < V; ++e)
#pragma unroll
      for (int i = 0; i < G::AR; ++i)
#pragma unroll
        for (int j = 0; j < G::AO; ++j) {
          const T d = MT::kOwnIsQuery ? xo[i].v[e] - yo[j].v[e] : yo[j].v[e] - xo[i].v[e];
          ts.ra[i][j] = Math<T>::fma(d, d, ts.ra[i][j]);
          if constexpr (MT::kGrad)
            ts.ga[i][j] = Math<T>::fma(go[MT::kGradOnOwn ? i : j].v[e], d, ts.ga[i][j]);
        }
  }
}

// Phase C for every unit of this thread: acc(own row, dim) += coef * (other - own)
// [- coef2 * g(other) for dL/dy], over the BO rows of the staged other tile.
template <typename T, int UPT, int M>
PF_DEV void phase_c(int tid, const Tiles<T>& sm, int ncc, ThreadState<T, UPT>& ts) {
  typedef Geo<T> G;
  constexpr int V = G::kVec;
  const int n_units = G::kRowGroups * ncc;
#pragma unroll
  for (int u = 0; u < UPT; ++u) {
    const int U = u * G::kThreads + tid;
    if (U < n_units) {
      const int r0 = (U / ncc) * G::TM;
      const int kc = (U % ncc) * G::TN;
      if constexpr (ModeTraits<M>::kSoftmax) {
        T alpha[G::TM];
        load_tm(&sm.ro(kRowAlpha, r0), alpha);
#pragma unroll
        for (int i = 0; i < G::TM; ++i)
#pragma unroll
          for (int j = 0; j < G::TN; ++j) ts.acc[u][i][j] *= alpha[i];
      }
      const int pk = kc / V;
      Pack<T> xw[G::TM];
#pragma unroll
      for (int i = 0; i < G::TM; ++i) xw[i] = ld16(pack_at<T, G::BR>(sm.own, r0 + i, pk));
      const T* cp = sm.coef + r0;
      const T* yp = pack_at<T, G::BO>(sm.other, 0, pk);
      const T* gp = pack_at<T, G::BO>(sm.g, 0, pk);  // dL/dy only
#pragma unroll 4
      for (int c = 0; c < G::BO; ++c) {
        T pc[G::TM];
        load_tm(cp + c * G::kLdp, pc);
        const Pack<T> yc = ld16(yp + c * V);
#pragma unroll
        for (int i = 0; i < G::TM; ++i)
#pragma unroll
          for (int j = 0; j < G::TN; ++j)
            ts.acc[u][i][j] = Math<T>::fma(pc[i], yc.v[j] - xw[i].v[j], ts.acc[u][i][j]);
        if constexpr (M == kBackwardY) {
          T pi[G::TM];
          load_tm(sm.coef2 + c * G::kLdp + r0, pi);
          const Pack<T> gc = ld16(gp + c * V);
#pragma unroll
          for (int i = 0; i < G::TM; ++i)
#pragma unroll
            for (int j = 0; j < G::TN; ++j)
              ts.acc[u][i][j] = Math<T>::fma(-pi[i], gc.v[j], ts.acc[u][i][j]);
        }
      }
    }
  }
}

template <typename T, int UPT>
PF_DEV void zero_acc(ThreadState<T, UPT>& ts) {
#pragma unroll
  for (int u = 0; u < UPT; ++u)
#pragma unroll
    for (int i = 0; i < Geo<T>::TM; ++i)
#pragma unroll
      for (int j = 0; j < Geo<T>::TN; ++j) ts.acc[u][i][j] = (T)0;
}

// Per-query scalars of row q (q < N) or of a padding row.
template <typename T>
struct QueryRow {
  T e2, lse2, dl;  // dl = g_v . v - g_l
  int64_t excl;
};

template <typename T>
PF_DEV QueryRow<T> load_query_row(const Params<T>& P, int64_t q) {
  QueryRow<T> r;
  if (q < P.N) {
    const T e = P.eps_rows ? P.eps_rows[q] : (T)0;
    r.e2 = P.eps_rows ? e * e : P.eps2;
    r.excl = P.exclude ? P.exclude[q] : -1;
    r.lse2 = P.lse2_in ? P.lse2_in[q] : (T)0;
    r.dl = (P.delta ? P.delta[q] : (T)0) - (P.gl ? P.gl[q] : (T)0);
  } else {
    r.e2 = (T)1;
    r.excl = -1;
    r.lse2 = (T)-INFINITY;  // a padding query has no field and no gradient
    r.dl = (T)0;
  }
  return r;
}

// Where one block stands: own rows [own0, own0 + own_cnt) and dimension window `by`.
template <typename T>
struct BlockCtx {
  Tiles<T> sm;
  const Params<T>& P;
  const Plan& pl;
  int64_t n_oth, own0, S, W, w0, wlen, by;
  int own_cnt, ncc;
  const T* own_src;
  const T* oth_src;

  template <int M>
  PF_DEV static BlockCtx make(const Params<T>& P, const Plan& pl, unsigned char* smem, int64_t bx,
                              int64_t by) {
    typedef Geo<T> G;
    constexpr bool q = ModeTraits<M>::kOwnIsQuery;
    const int64_t n_own = q ? P.N : P.B;
    const int64_t own0 = bx * G::BR;
    const int64_t w0 = by * pl.window;
    const int64_t wlen = pl.dv - w0 < pl.window ? pl.dv - w0 : pl.window;
    return BlockCtx{Tiles<T>(smem, pl), P, pl, q ? P.B : P.N, own0, pl.splits, pl.window, w0,
                    wlen, by, (int)(n_own - own0 < G::BR ? n_own - own0 : G::BR),
                    (int)(wlen / G::TN), q ? P.x : P.y, q ? P.y : P.x};
  }
  // Length of dimension chunk ch (phase A stages D in window-sized chunks).
  PF_DEV int64_t chunk_len(int64_t ch) const { return pl.dv - ch * W < W ? pl.dv - ch * W : W; }
};

// Own rows and their scalars, the own tiles when the window is all of D, zero accumulators.
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void init_block(Exec& ex, const BlockCtx<T>& c, States& st) {
  typedef Geo<T> G;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  ex.each([&](int t) {
    for (int r = t; r < G::BR; r += G::kThreads) {
      const int64_t i = c.own0 + r;
      sm.ro(kRowM, r) = Limits<T>::kNoCharge;
      sm.ro(kRowL, r) = (T)0;
      sm.ro(kRowAlpha, r) = (T)1;
      sm.ro(kRowDw, r) = (T)0;
      if constexpr (ModeTraits<M>::kOwnIsQuery) {
        const QueryRow<T> q = load_query_row(P, i);
        sm.ro(kRowE2, r) = q.e2;
        sm.ro(kRowLse2, r) = q.lse2;
        sm.ro(kRowDelta, r) = q.dl;
        sm.excl_own[r] = q.excl;
        if constexpr (M == kFlow) {
          sm.ro(kRowDt, r) = i < P.N ? (T)P.dt[i] : (T)0;  // the step of the state updates
        }
      } else {
        sm.ro(kRowLw, r) = i < P.B ? charge_log2_weight(P.w, i) : Limits<T>::kNoCharge;
        sm.excl_own[r] = -1;
      }
    }
    if (c.S == 1) {
      stage_rows<T, G::BR>(t, sm.own, c.own_src, c.own0, c.own_cnt, P.ld, 0, c.pl.dv);
      if (M == kBackwardX)
        stage_rows<T, G::BR>(t, sm.g, P.gv, c.own0, c.own_cnt, P.ld, 0, c.pl.dv);
    }
    zero_acc(st(t));
  });
  ex.sync();
}

// Pairwise r2 (and g . (x - y)) of the own rows against other rows [o0, o0 + oth_cnt), chunk by
// chunk over D; afterwards the staged tiles hold this block's window (phase C reads it).
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void distances(Exec& ex, const BlockCtx<T>& c, States& st, int64_t o0, int oth_cnt) {
  typedef Geo<T> G;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  for (int64_t ch = 0; ch < c.S; ++ch) {
    const int64_t k0 = ch * c.W, klen = c.chunk_len(ch);
    ex.each([&](int t) {
      if (ch == 0) {
        for (int o = t; o < G::BO; o += G::kThreads) {
          const int64_t j = o0 + o;
          if constexpr (ModeTraits<M>::kOwnIsQuery) {
            sm.rt(kOthLw, o) = j < P.B ? charge_log2_weight(P.w, j) : Limits<T>::kNoCharge;
          } else {
            const QueryRow<T> q = load_query_row(P, j);
            sm.rt(kOthE2, o) = q.e2;
            sm.rt(kOthLse2, o) = q.lse2;
            sm.rt(kOthDelta, o) = q.dl;
            sm.excl_oth[o] = q.excl;
          }
        }
      }
      stage_rows<T, G::BO>(t, sm.other, c.oth_src, o0, oth_cnt, P.ld, k0, klen);
      if (M == kBackwardY) stage_rows<T, G::BO>(t, sm.g, P.gv, o0, oth_cnt, P.ld, k0, klen);
      if (c.S > 1) {
        stage_rows<T, G::BR>(t, sm.own, c.own_src, c.own0, c.own_cnt, P.ld, k0, klen);
        if (M == kBackwardX)
          stage_rows<T, G::BR>(t, sm.g, P.gv, c.own0, c.own_cnt, P.ld, k0, klen);
      }
    });
    ex.sync();
    ex.each([&](int t) {
      ThreadState<T, UPT>& ts = st(t);
      if (ch == 0) {
#pragma unroll
        for (int i = 0; i < G::AR; ++i)
#pragma unroll
          for (int j = 0; j < G::AO; ++j) ts.ra[i][j] = ts.ga[i][j] = (T)0;
      }
      phase_a<T, UPT, M>(t, sm, klen, ts);
    });
    ex.sync();
  }
  if (c.S > 1 && c.by != c.S - 1) {  // phase C needs this block's window back in shared memory
    ex.each([&](int t) {
      stage_rows<T, G::BO>(t, sm.other, c.oth_src, o0, oth_cnt, P.ld, c.w0, c.wlen);
      stage_rows<T, G::BR>(t, sm.own, c.own_src, c.own0, c.own_cnt, P.ld, c.w0, c.wlen);
      if (M == kBackwardX)
        stage_rows<T, G::BR>(t, sm.g, P.gv, c.own0, c.own_cnt, P.ld, c.w0, c.wlen);
      if (M == kBackwardY) stage_rows<T, G::BO>(t, sm.g, P.gv, o0, oth_cnt, P.ld, c.w0, c.wlen);
    });
    ex.sync();
  }
}

// Calls f(i, r, to) for the AR own rows r = tr + kLanes i of thread t's phase-A register block
// (its other rows are to + kLanes j, j < AO); f runs unrolled, so ts.ra[i][.] stays in registers.
template <typename T, class F>
PF_DEV void for_thread_rows(int t, F&& f) {
  typedef Geo<T> G;
  const int tr = t / G::kLanes, to = t % G::kLanes;
#pragma unroll
  for (int i = 0; i < G::AR; ++i) f(i, tr + G::kLanes * i, to);
}

// Reductions of row r's kLanes per-thread partials (sm.red), in lane order: deterministic.
template <typename T>
PF_DEV T row_partials_max(const Tiles<T>& sm, int r) {
  T m = sm.red[r * kRedStride];
  for (int l = 1; l < Geo<T>::kLanes; ++l) m = Math<T>::max(m, sm.red[r * kRedStride + l]);
  return m;
}

template <typename T>
PF_DEV T row_partials_sum(const Tiles<T>& sm, int r) {
  T s = (T)0;
  for (int l = 0; l < Geo<T>::kLanes; ++l) s += sm.red[r * kRedStride + l];
  return s;
}

// Forward and flow, one tile of charges: scores, the lazy online-softmax update of every row,
// probabilities into the coefficient tile, running sums, then phase C.
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void softmax_tile(Exec& ex, const BlockCtx<T>& c, States& st, int64_t o0, int oth_cnt) {
  typedef Geo<T> G;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  // Scores and each thread's partial row maxima.
  ex.each([&](int t) {
    ThreadState<T, UPT>& ts = st(t);
    for_thread_rows<T>(t, [&](int i, int r, int to) {
      const T e2 = sm.ro(kRowE2, r);
      const int64_t ex_j = sm.excl_own[r];
      T pm = Limits<T>::kNoCharge;
#pragma unroll
      for (int j = 0; j < G::AO; ++j) {
        const int o = to + G::kLanes * j;
        const bool valid = o < oth_cnt && ex_j != o0 + o;
        ts.ra[i][j] = masked_score(ts.ra[i][j] + e2, sm.rt(kOthLw, o), P.half_p, P.tiny, valid);
        pm = Math<T>::max(pm, ts.ra[i][j]);
      }
      sm.red[r * kRedStride + to] = pm;
    });
  });
  ex.sync();
  // Row maxima, lazy move of the running max.
  ex.each([&](int t) {
    for (int r = t; r < G::BR; r += G::kThreads) {
      T m = sm.ro(kRowM, r);
      sm.ro(kRowAlpha, r) = numerics::online_max_update<Math<T>>(m, row_partials_max(sm, r));
      sm.ro(kRowM, r) = m;
    }
  });
  ex.sync();
  // Probabilities into the coefficient tile, partial row sums.
  ex.each([&](int t) {
    ThreadState<T, UPT>& ts = st(t);
    for_thread_rows<T>(t, [&](int i, int r, int to) {
      const T m = sm.ro(kRowM, r);
      T ps = (T)0;
#pragma unroll
      for (int j = 0; j < G::AO; ++j) {
        const int o = to + G::kLanes * j;
        const T p = numerics::online_weight_or_zero<Math<T>>(ts.ra[i][j], m);
        sm.coef[o * G::kLdp + r] = p;
        ps += p;
      }
      sm.red[r * kRedStride + to] = ps;
    });
  });
  ex.sync();
  ex.each([&](int t) {
    for (int r = t; r < G::BR; r += G::kThreads)
      sm.ro(kRowL, r) =
          Math<T>::fma(sm.ro(kRowL, r), sm.ro(kRowAlpha, r), row_partials_sum(sm, r));
    phase_c<T, UPT, M>(t, sm, c.ncc, st(t));
  });
  ex.sync();
}

// Backward, one tile of the other side: the pair gradient terms into the coefficient tiles
// (a; and pi for dL/dy), dL/dw partial sums per charge, then phase C.
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void gradient_tile(Exec& ex, const BlockCtx<T>& c, States& st, int64_t o0, int oth_cnt) {
  typedef Geo<T> G;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  ex.each([&](int t) {
    ThreadState<T, UPT>& ts = st(t);
    for_thread_rows<T>(t, [&](int i, int r, int to) {
      T pws = (T)0;
#pragma unroll
      for (int j = 0; j < G::AO; ++j) {
        const int o = to + G::kLanes * j;
        PairTerm<T> pg;
        if constexpr (M == kBackwardX) {
          const bool valid = o < oth_cnt && sm.excl_own[r] != o0 + o;
          pg = masked_pair_gradient(ts.ra[i][j] + sm.ro(kRowE2, r), ts.ga[i][j], sm.rt(kOthLw, o),
                                    sm.ro(kRowLse2, r), sm.ro(kRowDelta, r), P.power, P.half_p,
                                    P.tiny, valid);
        } else {
          const bool valid = o < oth_cnt && r < c.own_cnt && sm.excl_oth[o] != c.own0 + r;
          pg = masked_pair_gradient(ts.ra[i][j] + sm.rt(kOthE2, o), ts.ga[i][j], sm.ro(kRowLw, r),
                                    sm.rt(kOthLse2, o), sm.rt(kOthDelta, o), P.power, P.half_p,
                                    P.tiny, valid);
          sm.coef2[o * G::kLdp + r] = pg.pi;
          pws += pg.pw;
        }
        sm.coef[o * G::kLdp + r] = pg.a;
      }
      if (M == kBackwardY) sm.red[r * kRedStride + to] = pws;
    });
  });
  ex.sync();
  ex.each([&](int t) {
    if constexpr (M == kBackwardY) {
      for (int r = t; r < G::BR; r += G::kThreads) sm.ro(kRowDw, r) += row_partials_sum(sm, r);
      if (P.gy == nullptr) return;  // only dL/dw was asked for
    }
    phase_c<T, UPT, M>(t, sm, c.ncc, st(t));
  });
  ex.sync();
}

// Every tile of the other side: this block's window accumulates in the registers.
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void sweep(Exec& ex, const BlockCtx<T>& c, States& st) {
  typedef Geo<T> G;
  for (int64_t o0 = 0; o0 < c.n_oth; o0 += G::BO) {
    const int oth_cnt = (int)(c.n_oth - o0 < G::BO ? c.n_oth - o0 : G::BO);
    distances<T, UPT, M>(ex, c, st, o0, oth_cnt);
    if constexpr (ModeTraits<M>::kSoftmax)
      softmax_tile<T, UPT, M>(ex, c, st, o0, oth_cnt);
    else
      gradient_tile<T, UPT, M>(ex, c, st, o0, oth_cnt);
  }
}

// Outputs of this block's window: v and lse2 (forward), dL/dx, or dL/dy and sum_i gs / w.
template <typename T, int UPT, int M, class Exec, class States>
PF_DEV void write_outputs(Exec& ex, const BlockCtx<T>& c, States& st) {
  typedef Geo<T> G;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  ex.each([&](int t) {
    ThreadState<T, UPT>& ts = st(t);
    if (c.by == 0) {
      for (int r = t; r < c.own_cnt; r += G::kThreads) {
        if (M == kForward) {
          const T m = sm.ro(kRowM, r), l = sm.ro(kRowL, r);
          P.lse2[c.own0 + r] = numerics::row_lse2(m, l, numerics::row_is_dead(m, l));
        }
        if (M == kBackwardY && P.gwsum) P.gwsum[c.own0 + r] = sm.ro(kRowDw, r);
      }
    }
    if (M == kBackwardY && P.gy == nullptr) return;
    T* out = M == kForward ? P.v : (M == kBackwardX ? P.gx : P.gy);
#pragma unroll
    for (int u = 0; u < UPT; ++u) {
      const int U = u * G::kThreads + t;
      if (U >= G::kRowGroups * c.ncc) continue;
      const int r0 = (U / c.ncc) * G::TM, kc = (U % c.ncc) * G::TN;
#pragma unroll
      for (int i = 0; i < G::TM; ++i) {
        const int r = r0 + i;
        if (r >= c.own_cnt) continue;
        Pack<T> o;
        if constexpr (M == kForward) {
          const T m = sm.ro(kRowM, r), l = sm.ro(kRowL, r);
          const bool dead = numerics::row_is_dead(m, l);
#pragma unroll
          for (int j = 0; j < G::TN; ++j)
            o.v[j] = numerics::field_from_acc(ts.acc[u][i][j], l, dead);
        } else if constexpr (M == kBackwardX) {
          // dL/dx = g_v + sum_j a (y - x)
          const Pack<T> g = ld16(pack_at<T, G::BR>(sm.g, r, kc / G::kVec));
#pragma unroll
          for (int j = 0; j < G::TN; ++j) o.v[j] = g.v[j] + ts.acc[u][i][j];
        } else {
#pragma unroll
          for (int j = 0; j < G::TN; ++j) o.v[j] = ts.acc[u][i][j];
        }
        st16(out + (c.own0 + r) * P.ld + c.w0 + kc, o);
      }
    }
  });
}

// The fused flow: every step and stage of the block's queries, one field sweep per stage with the
// stage's heights as softening and the Euler / RK4 update as its epilogue. The state being
// integrated lives in the own tile (the next stage's input); the RK4 step start and running slope
// combination live in global memory, each (row, dim) entry owned by one thread for the whole call.
template <typename T, int UPT, class Exec, class States>
PF_DEV void flow_block(Exec& ex, const BlockCtx<T>& c, States& st) {
  typedef Geo<T> G;
  typedef Math<T> SM;
  const Tiles<T>& sm = c.sm;
  const Params<T>& P = c.P;
  const int n_stages = P.solver == 1 ? numerics::kRk4Stages : 1;
  for (int64_t step = 0; step < P.n_steps; ++step) {
    for (int stage = 0; stage < n_stages; ++stage) {
      ex.each([&](int t) {
        for (int r = t; r < G::BR; r += G::kThreads) {
          // Heights from the float64 times (a padding row gets z = 1: finite, never stored).
          const int64_t i = c.own0 + r;
          const double t0 = i < P.N ? P.t0[i] : 0.0, dt = i < P.N ? P.dt[i] : 0.0;
          const double cs = n_stages == 1 ? 0.0 : numerics::rk4_c(stage);
          sm.ro(kRowE2, r) = (T)numerics::stage_height2(t0, dt, step, cs);
          sm.ro(kRowM, r) = Limits<T>::kNoCharge;
          sm.ro(kRowL, r) = (T)0;
        }
        zero_acc(st(t));
      });
      ex.sync();
      sweep<T, UPT, kFlow>(ex, c, st);
      // Epilogue: v = -acc / l, then the Euler update or the RK4 stage update.
      ex.each([&](int t) {
        ThreadState<T, UPT>& ts = st(t);
#pragma unroll
        for (int u = 0; u < UPT; ++u) {
          const int U = u * G::kThreads + t;
          if (U >= G::kRowGroups * c.ncc) continue;
          const int r0 = (U / c.ncc) * G::TM, kc = (U % c.ncc) * G::TN;
#pragma unroll
          for (int i = 0; i < G::TM; ++i) {
            const int r = r0 + i;
            if (r >= c.own_cnt) continue;
            const int64_t q = c.own0 + r;
            const T l = sm.ro(kRowL, r);
            const bool dead = numerics::row_is_dead(sm.ro(kRowM, r), l);
            const T dtq = sm.ro(kRowDt, r);
            T* xs = pack_at<T, G::BR>(sm.own, r, kc / G::kVec);
#pragma unroll
            for (int j = 0; j < G::TN; ++j) {
              const T vq = numerics::field_from_acc(ts.acc[u][i][j], l, dead);
              if (n_stages == 1) {
                xs[j] = numerics::euler_update<SM>(xs[j], vq, dtq);
              } else {
                const int64_t at = q * P.ld + kc + j;
                T base = P.state[at];
                T comb = stage == 0 ? (T)0 : P.comb[at];
                xs[j] = numerics::rk4_stage_update<SM>(stage, vq, dtq, base, comb);
                P.comb[at] = comb;
                if (stage == n_stages - 1) P.state[at] = base;
              }
            }
          }
        }
      });
      ex.sync();
    }
  }
  ex.each([&](int t) {
    for (int it = t; it < c.own_cnt * c.ncc; it += G::kThreads) {
      const int r = it / c.ncc, kc = (it % c.ncc) * G::TN;
      st16(P.state + (c.own0 + r) * P.ld + kc, ld16(pack_at<T, G::BR>(sm.own, r, kc / G::kVec)));
    }
  });
}

// One block: own rows [bx * BR, ...), dimension window `by` of the plan.
template <typename T, int UPT, int M, class Exec>
PF_DEV void run_block(Exec& ex, const Params<T>& P, const Plan& pl, unsigned char* smem, int64_t bx,
                      int64_t by) {
  const BlockCtx<T> c = BlockCtx<T>::template make<M>(P, pl, smem, bx, by);
  auto st = ex.template states<ThreadState<T, UPT>>();
  init_block<T, UPT, M>(ex, c, st);
  if constexpr (M == kFlow) {
    flow_block<T, UPT>(ex, c, st);
  } else {
    sweep<T, UPT, M>(ex, c, st);
    write_outputs<T, UPT, M>(ex, c, st);
  }
}

}  // namespace cuda
}  // namespace poissonflow
