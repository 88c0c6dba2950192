// Micro-benchmark of the vector pipes the CPU kernels use, compiled once per instruction set
// beside the kernels (CMakeLists.txt) so that it runs the code the dispatcher chose: the same
// vector width, the same FMA contraction, and the kernels' own exp2, log2, square root and
// power-form weight (simd.h, power_form.h), not a library's.
//
// Each operation runs on kChains independent vectors (enough to cover every latency with
// throughput: 4-cycle FMA latency x 2 pipes needs 8), in a loop whose only work is the operation
// itself: the operands pass through an empty asm statement each iteration, which keeps them in
// vector registers and hides their values from the compiler (nothing is folded, hoisted or
// vectorised away) and costs no instruction. Every thread of the team runs the same loop; the
// figure is vector operations per second of the whole team, from one wall-clock interval that
// starts and ends at barriers. bench/ceiling.py turns these rates and the kernels' instruction
// mix into each kernel's ceiling (docs/performance.md).
//
// The loop_* operations run the kernels' own inner loops (field_tile.h, field_backward.h: the
// same inline functions, register blocks and run lengths) on data that stays in L1, so that
// their rate against the ceiling's model separates what the loops as compiled can do from what
// the caches and the tiles' set-up cost in the kernels.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "field_backward.h"
#include "field_tile.h"
#include "power_form.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace poissonflow {
// dispatch.cpp (declared here rather than through dispatch.h, which brings the STL into this
// per-ISA translation unit): phase A's broadcast operands on this CPU, which loop_A and loop_A'
// run as the kernels do.
int resolve_broadcasts(int requested);
namespace PF_ISA_NS {

namespace {

#if defined(__x86_64__) || defined(__i386__)
#define PF_OPAQUE(v) __asm__ volatile("" : "+v"(v))
#elif defined(__aarch64__)
#define PF_OPAQUE(v) __asm__ volatile("" : "+w"(v))
#else
#define PF_OPAQUE(v) __asm__ volatile("" : "+m"(v))
#endif

constexpr int kChains = 12;

double now_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Operation codes (pipe_ops() lists them by name, in this order).
enum Op : int {
  kFma = 0,    // a = a * b + c
  kAdd,        // a = a + b (subtraction runs on the same pipe)
  kMul,        // a = a * b
  kFmaAdd,     // one FMA and one add, independent (2 operations per step)
  kMax,        // a = max(a, b)
  kDiv,        // a = b / a
  kSqrt,       // a = sqrt(a)
  kExp2,       // r = vexp2(a), simd.h
  kLog2,       // r = vlog2(a), simd.h
  kPowWeight,  // r = power_weight(a, 1, plan) with p/2 = param (power_form.h)
  kLoadFma,    // a = a + y[k] * x (a vector load shared by the chains, as phase C)
  kLoad,       // a = load(y + i W): full-width vector loads from L1, nothing else
  kBcastFma,   // a = a + y * x[i], x[i] a broadcast memory operand reloaded every step (phase C')
  kLoadBcastFma,  // a = a + y[i] * x[i]: a vector load and a broadcast operand per FMA
  kSubFma,     // r2 += (y - x)^2 on 12 chains: the forward's pair-dimension (1 sub + 1 FMA)
  kPhaseA,     // the forward's phase-A step from L1 (phase_a_step; param: the block shape)
  kClock,      // dependent one-cycle scalar additions: the core clock (x86-64 only)
  kStore,      // store(y + i W, a): full-width vector stores to L1, nothing else
  kLoadStore,  // three vector loads and one store per chain (the backward C' mix of memory ops)
  kLoopA,      // the forward's phase A loop (distance_block) from L1: pair-dimension vectors
  kLoopC,      // the forward's phase C loop (accumulate_block) from L1
  kLoopAGrad,  // the backward's phase A' loop (distance_block with g.d) from L1
  kLoopCGrad,  // the backward's phase C' loop (dx and dy, with pi g) from L1
  kAddStore,   // four dependent adds per chain and step, then a store of it: do stores take
               // add-pipe slots? (the rate counts the adds)
  kFmaStore,   // the same with FMAs
  kSqrtNewton,  // a = vsqrt_newton(a), simd.h: the estimate and a Newton step (FMA pipes)
  kFma4,       // four dependent FMAs per chain and step (48 a step): fma+div's base
  kFma4Div,    // the same and one division a step beside them: what the division takes of the
               // FMA pipes (the rate counts the FMAs)
  kFma4Sqrt,   // the same with one square root a step
  kNumOps
};

const char* const kOpNames[kNumOps] = {"fma", "add", "mul", "fma+add", "max", "div", "sqrt",
                                       "exp2", "log2", "pow_weight", "load+fma",
                                       "load", "bcast+fma",
                                       "load+bcast+fma", "sub+fma", "phaseA", "clock",
                                       "store", "load+store", "loop_A", "loop_C",
                                       "loop_A'", "loop_C'", "add4+store", "fma4+store",
                                       "sqrt_newton", "fma4", "fma4+div", "fma4+sqrt"};

// kChains independent chains as named variables (an array of vectors could stay in memory,
// adding a load and a store to every step).
#define PF_REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
// Each chain (a, or a and its sink s) made opaque, so that the compiler computes and keeps it.
#define PF_HIDE_A(i) PF_OPAQUE(a##i);
#define PF_HIDE_AS(i) PF_OPAQUE(a##i); PF_OPAQUE(s##i);

// `iters` steps of `step` (a callable: V step(V a, int chain) returning the new a) on kChains
// chains; with kSink the result goes to a separate sink and the input is only made opaque
// (throughput of a function of the input, no dependency between steps).
template <typename T, bool kSink, class Step>
__attribute__((noinline)) void chains(int64_t iters, T start, T spread, Step step) {
  typedef VecT<T> V;
#define PF_DECL(i) V a##i = vbroadcast<T>(start + spread * (T)i), s##i = V{};
  PF_REP(PF_DECL)
#undef PF_DECL
  for (int64_t it = 0; it < iters; ++it) {
    if constexpr (kSink) {
#define PF_STEP(i) s##i = step(a##i, i);
      PF_REP(PF_STEP)
#undef PF_STEP
      PF_REP(PF_HIDE_AS)
    } else {
#define PF_STEP(i) a##i = step(a##i, i);
      PF_REP(PF_STEP)
#undef PF_STEP
      PF_REP(PF_HIDE_A)
    }
  }
  PF_REP(PF_HIDE_AS)
}

// distance_block's step for QB queries x CB charge vectors (d = y - x; r2 += d d), its operands
// from L1: the charge rows (64 of them, consecutive as in a tile's column block) and the
// queries' scalars as broadcast operands, or with kVectorX the queries' coordinates already
// broadcast in memory (W copies each) and read as full vectors: the same arithmetic without
// broadcast loads, which on Zen 4 slow the step by half (docs/performance.md, "Zen 4").
// Returns the vector instructions executed.
template <typename T, int QB, int CB, bool kVectorX = false>
__attribute__((noinline)) int64_t phase_a_step(int64_t iters) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  constexpr int kRows = 64;
  alignas(64) T yt[kRows * CB * W];
  alignas(64) T xq[QB * kRows];
  alignas(64) T xv[kVectorX ? QB * kRows * W : 1];
  for (int i = 0; i < kRows * CB * W; ++i) yt[i] = (T)(1e-3 * (i % 13));
  for (int i = 0; i < QB * kRows; ++i) xq[i] = (T)(1e-2 * (i % 7));
  if (kVectorX)
    for (int i = 0; i < QB * kRows * W; ++i) xv[i] = xq[i / W];
  V r[QB][CB] = {};
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t k = it & (kRows - 1);
    const T* yp = yt + k * CB * W;
    const T* xp = kVectorX ? xv + k * W : xq + k;
    __asm__ volatile("" : "+r"(yp), "+r"(xp));
    V y[CB];
    for (int c = 0; c < CB; ++c) y[c] = vload<T>(yp + c * W);
    for (int q = 0; q < QB; ++q) {
      if constexpr (kVectorX) {
        V x = vload<T>(xp + q * kRows * W);
        __asm__("" : "+v"(x));  // one load, not one memory operand per subtraction
        for (int c = 0; c < CB; ++c) {
          const V d = y[c] - x;
          r[q][c] += d * d;
        }
      } else {
        const T xs = xp[q * kRows];  // as distance_block's shared form: a broadcast load
        for (int c = 0; c < CB; ++c) {
          const V d = y[c] - xs;
          r[q][c] += d * d;
        }
      }
    }
  }
  for (int q = 0; q < QB; ++q)
    for (int c = 0; c < CB; ++c) PF_OPAQUE(r[q][c]);
  return 2 * QB * CB * iters;
}

// ---- the kernels' own loops from L1 -------------------------------------------------------------
// Each returns the pair-dimension vectors it processed (one vector of W pairs times one
// dimension), the unit of the ceiling's per-dimension mix (bench/ceiling.py).

// Phases A and A': distance_block over kLoopDims dimensions (its 16-dimension sum blocks
// included) for the kernel's query block against one column block of a charge tile, the rows
// contiguous (2 vectors wide: a 16.5 KiB strip) so that everything stays in L1.
constexpr int64_t kLoopDims = 129;

// `calls` calls of phase A's or A''s register block as the kernels make them: the forward's
// distance_block with its sums stored as scores_block stores its scores, the backward's own
// block function (backward_pairs_block), the rows D apart from one base as in the kernels' tile
// scratch. One function of its own, everything inlined into it, the repetitions inside: GCC
// then allocates the loop's registers as it does in the kernels (`python bench/asm_mix.py
// --loops` compares each loop_* with the kernels' loops, instruction class by class). Called
// from the timing loop with its values live, the forward's loop moved three query pointers in
// and out of vector registers every step and the backward's kept its g.(x - y) sums in memory,
// a store a step: 0.85 and 0.84 of their model on a Zen 4, 0.98 and 0.99 as the kernels
// compile them (docs/performance.md, "The loops alone").
template <typename T, int QB, bool kGrad, bool kEmbed>
__attribute__((noinline, flatten)) void distance_calls(BackwardScratch<T>& bs,
                                                       const Packed<T>& pk, const T* yk,
                                                       int64_t ld, T* out, int64_t calls) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W, CB = Geometry<T>::CB;
  const int64_t D = pk.D;
  for (int64_t it = 0; it < calls; ++it) {
    int q0 = 0;
    __asm__ volatile("" : "+r"(q0));  // a run-time query row, as the kernels' q0
    if constexpr (kGrad) {
      backward_pairs_block<T, QB, CB, true, kEmbed>(bs, pk, yk, ld, q0, 0);
    } else {
      V acc[QB][CB], unused[QB][CB];
      const T* xq[QB];
      for (int q = 0; q < QB; ++q) xq[q] = bs.xt + (int64_t)(q0 + q) * D;
      distance_block<T, QB, CB, false, kEmbed>(xq, xq, yk, ld, D, acc, unused);
      for (int q = 0; q < QB; ++q)
        for (int c = 0; c < CB; ++c) vstore<T>(out + (q * CB + c) * W, acc[q][c]);
    }
    __asm__ volatile("" : : : "memory");  // the stores are read: no call is dropped
  }
}

template <typename T, int QB, bool kGrad, bool kEmbed>
int64_t loop_distance(int64_t iters) {
  constexpr int W = VecTraits<T>::W, CB = Geometry<T>::CB;
  const int64_t D = kLoopDims, ld = CB * W;
  T* y = (T*)aligned_buffer(sizeof(T) * (size_t)(D * ld));
  T* out = (T*)aligned_buffer(sizeof(T) * (size_t)(QB * CB * W));
  // the charges' rows as the kernels' packed layout has them (y is not owned by pk), the
  // queries' coordinates (and g) in the backward's tile scratch, which both forms read
  Packed<T> pk;
  int64_t rows = D;
  __asm__ volatile("" : "+r"(rows));  // a run-time row length, as the kernels': not folded
  pk.D = rows;                         // into the loop's addresses
  pk.CT = pk.Bp = pk.B = ld;
  pk.yT = y;
  BackwardScratch<T> bs;
  const bool ok = y && out && bs.allocate(TileShape<T>{QB, (int)ld, QB}, D);
  int64_t calls = 0;
  if (ok) {
    for (int64_t i = 0; i < D * ld; ++i) y[i] = (T)(1e-3 * (double)(i % 13));
    for (int64_t i = 0; i < QB * D; ++i) bs.xt[i] = bs.gt[i] = (T)(1e-2 * (double)(i % 7));
    for (int q = 0; q < QB; ++q) bs.e2[q] = (T)0;
    calls = iters / D + 1;
    distance_calls<T, QB, kGrad, kEmbed>(bs, pk, y, ld, out, calls);
  }
  bs.release();
  free(y);
  free(out);
  return calls * D * QB * CB;
}

// Phases C and C': the kernels' register blocks over the run length of a D = 129 tile (its
// 256 charges: 16 vectors in float32), kLoopBlockDims dimensions and four query rows, in the
// kernels' order (dimension blocks outside, query blocks inside: field_tile,
// backward_accumulate).
constexpr int kLoopBlockDims = 6;  // a multiple of every ISA's dimension block (6, 3 and 2)
constexpr int kLoopRows = 4;       // a multiple of every query block (2 and 4)

// `calls` calls of phase C's or C''s tile function, in a function of their own with everything
// inlined into it, as distance_calls and for the same reason: inlined into the operation's
// switch, phase C''s loop read 14 vectors a step where the kernel's reads 10.
template <typename T, bool kBackward>
__attribute__((noinline, flatten)) void accumulate_calls(TileScratch<T>& sc, BackwardScratch<T>& bs,
                                                         const Packed<T>& pk, const T* y, T* dy,
                                                         int64_t ld, int nvec, int64_t calls) {
  for (int64_t it = 0; it < calls; ++it) {
    if constexpr (kBackward)
      backward_accumulate<T, true, true, true>(bs, pk, dy, 0, nvec);
    else
      accumulate_tile<T>(sc, pk, y, ld, nvec);
    __asm__ volatile("" : : : "memory");  // the accumulators are read: no call is dropped
  }
}

template <typename T, bool kBackward>
int64_t loop_accumulate(int64_t iters) {
  constexpr int W = VecTraits<T>::W, QT = kLoopRows;
  const TileShape<T> ts = tile_shape<T>(kLoopDims);
  const int nvec = ts.CT / W;
  const int64_t D = kLoopBlockDims, ld = ts.CT;
  const TileShape<T> shape{QT, ts.CT, ts.blk};
  T* y = (T*)aligned_buffer(sizeof(T) * (size_t)(D * ld));
  T* dy = (T*)aligned_buffer(sizeof(T) * (size_t)(D * ld));
  // one charge tile of D rows, as the kernels' packed layout has it (y is not owned by pk)
  Packed<T> pk;
  pk.D = D;
  pk.CT = pk.Bp = pk.B = ld;
  pk.yT = y;
  TileScratch<T> sc;
  BackwardScratch<T> bs;
  const bool ok = y && dy && (kBackward ? bs.allocate(shape, D) : sc.allocate(shape, D));
  int64_t done = 0;
  if (ok) {
    for (int64_t i = 0; i < D * ld; ++i) {
      y[i] = (T)(1e-3 * (double)(i % 13));
      dy[i] = (T)0;
    }
    T* xt = kBackward ? bs.xt : sc.xt;
    T* rows = kBackward ? bs.C : sc.S;  // the weights (forward) or c (backward) per pair
    T* acc = kBackward ? bs.accdx : sc.acc;
    for (int64_t i = 0; i < QT * D; ++i) xt[i] = (T)(1e-2 * (double)(i % 7));
    for (int64_t i = 0; i < (int64_t)QT * ts.CT; ++i) rows[i] = (T)(1e-4 * (double)(i % 11));
    for (int64_t i = 0; i < QT * D * W; ++i) acc[i] = (T)0;
    if (kBackward) {
      for (int64_t i = 0; i < (int64_t)QT * ts.CT; ++i) bs.P[i] = (T)(1e-5 * (double)(i % 3));
      for (int64_t i = 0; i < QT * D; ++i) bs.gt[i] = (T)(1e-2 * (double)(i % 5));
    }
    const int64_t per_call = (int64_t)QT * D * nvec;
    const int64_t calls = iters / per_call + 1;
    accumulate_calls<T, kBackward>(sc, bs, pk, y, dy, ld, nvec, calls);
    done = calls * per_call;
  }
  if (kBackward) bs.release(); else sc.release();
  free(y);
  free(dy);
  return done;
}

template <typename T>
int64_t run_op(int op, int64_t iters, double param) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  V b = vbroadcast<T>((T)0.999), c = vbroadcast<T>((T)1e-3);
  PF_OPAQUE(b);
  PF_OPAQUE(c);
  int64_t per_iter = kChains;
  const bool embed = resolve_broadcasts(0) == 2;
  switch (op) {
    case kFma:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return a * b + c; });
      break;
    case kAdd:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return a + c; });
      break;
    case kMul:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return a * b; });
      break;
    case kAddStore:
    case kFmaStore: {
      // 12 chains, each 4 dependent operations and a store of the result to its own line per
      // step: 48 operations to 12 stores, the kernels' proportion or more. Were the stores free
      // of the arithmetic pipes, the rate would be the operation's own ("add", "fma"). A case
      // of its own: folded into kStore's loop (one loop body choosing among four variants) the
      // adds ran at 0.96 a cycle beside the stores instead of 1.00, which would have read as
      // the stores' cost.
      char* raw = (char*)aligned_buffer(2 * 4096);
      if (!raw) return -1;
      T* st = (T*)(raw + (4096 - ((uintptr_t)raw & 4095)) % 4096);
      for (int64_t i = 0; i < 12 * W; ++i) st[i] = (T)0;
#define PF_DECL(i) V a##i = vbroadcast<T>((T)(0.5 + 0.01 * i));
      PF_REP(PF_DECL)
#undef PF_DECL
      per_iter = 4 * kChains;
      const bool fma = op == kFmaStore;
      for (int64_t it = 0; it < iters; ++it) {
        T* sp = st;
        __asm__ volatile("" : "+r"(sp));
        if (fma) {
#define PF_STEP(i)                                                   \
  a##i = a##i * b + c; a##i = a##i * b + c; a##i = a##i * b + c;     \
  a##i = a##i * b + c; vstore<T>(sp + (i) * W, a##i);
          PF_REP(PF_STEP)
#undef PF_STEP
        } else {
#define PF_STEP(i)                                                   \
  a##i = a##i + c; a##i = a##i + c; a##i = a##i + c; a##i = a##i + c; \
  vstore<T>(sp + (i) * W, a##i);
          PF_REP(PF_STEP)
#undef PF_STEP
        }
        PF_REP(PF_HIDE_A)
      }
      free(raw);
      break;
    }
    case kFma4:
    case kFma4Div:
    case kFma4Sqrt: {
      // 48 FMAs a step keep the FMA pipes busy (12 chains of four, 16 cycles of latency
      // against 48 of issue at one 512-bit FMA a cycle); the division or root beside them,
      // whose result only the sink takes, needs the divider 6-10 cycles of the 48. Were the
      // divider a unit beside the pipes, the FMAs would keep their rate; what they lose is
      // the FMA-pipe issue the divider's instruction takes (on the Zen 4 two cycles: a 512-bit
      // division or root is two 256-bit halves issued on an FMA pipe; docs/performance.md,
      // "The divider").
#define PF_DECL(i) V a##i = vbroadcast<T>((T)(0.5 + 0.01 * i));
      PF_REP(PF_DECL)
#undef PF_DECL
      V q = vbroadcast<T>((T)1.7), s = V{};
      per_iter = 4 * kChains;
      for (int64_t it = 0; it < iters; ++it) {
#define PF_STEP(i) a##i = a##i * b + c; a##i = a##i * b + c; a##i = a##i * b + c; a##i = a##i * b + c;
        PF_REP(PF_STEP)
#undef PF_STEP
        if (op == kFma4Div) s = b / q;
        if (op == kFma4Sqrt) s = vsqrt<T>(q);
        PF_OPAQUE(q);
        PF_OPAQUE(s);
        PF_REP(PF_HIDE_A)
      }
      break;
    }
    case kFmaAdd: {
      // 12 FMA chains and 12 add chains, independent: do the two kinds issue side by side?
#define PF_DECL(i) V a##i = vbroadcast<T>((T)(0.5 + 0.01 * i)), s##i = a##i;
      PF_REP(PF_DECL)
#undef PF_DECL
      per_iter = 2 * kChains;
      for (int64_t it = 0; it < iters; ++it) {
#define PF_STEP(i) a##i = a##i * b + c; s##i = s##i + c;
        PF_REP(PF_STEP)
#undef PF_STEP
        PF_REP(PF_HIDE_AS)
      }
      break;
    }
    case kLoad: {
      alignas(64) T y[kChains * W];
      for (int i = 0; i < kChains * W; ++i) y[i] = (T)(1e-3 * i);
      const T* yp = y;
      for (int64_t it = 0; it < iters; ++it) {
        __asm__ volatile("" : "+r"(yp));  // the loads cannot be hoisted out of the loop
#define PF_STEP(i) V a##i = vload<T>(yp + i * W); PF_OPAQUE(a##i);
        PF_REP(PF_STEP)
#undef PF_STEP
      }
      break;
    }
    case kBcastFma:
    case kLoadBcastFma: {
      alignas(64) T x[kChains];
      alignas(64) T y[kChains * W];
      for (int i = 0; i < kChains; ++i) x[i] = (T)(1e-3 * i);
      for (int i = 0; i < kChains * W; ++i) y[i] = (T)(1e-3 * i);
      const T* xp = x;
      const T* yp = y;
      const bool with_load = op == kLoadBcastFma;
#define PF_DECL(i) V a##i = vbroadcast<T>((T)(0.5 + 0.01 * i));
      PF_REP(PF_DECL)
#undef PF_DECL
      for (int64_t it = 0; it < iters; ++it) {
        __asm__ volatile("" : "+r"(xp), "+r"(yp));  // reload the operands every step
        if (with_load) {
#define PF_STEP(i) a##i = a##i + vload<T>(yp + i * W) * xp[i]; PF_OPAQUE(a##i);
          PF_REP(PF_STEP)
#undef PF_STEP
        } else {
#define PF_STEP(i) a##i = a##i + b * xp[i]; PF_OPAQUE(a##i);
          PF_REP(PF_STEP)
#undef PF_STEP
        }
      }
      PF_REP(PF_HIDE_A)
      break;
    }
    case kSubFma: {
      // per step and chain: d = y_i - x; a_i += d d (y_i held, x a register): 2 instructions
#define PF_DECL(i) V a##i = V{}, y##i = vbroadcast<T>((T)(0.01 * i));
      PF_REP(PF_DECL)
#undef PF_DECL
      per_iter = 2 * kChains;
      for (int64_t it = 0; it < iters; ++it) {
#define PF_STEP(i) { const V d = y##i - c; a##i += d * d; }
        PF_REP(PF_STEP)
#undef PF_STEP
#define PF_HIDE(i) PF_OPAQUE(a##i); PF_OPAQUE(y##i);
        PF_REP(PF_HIDE)
#undef PF_HIDE
      }
      break;
    }
    case kPhaseA:
      // param: the register block (0: 4 x 2, the kernel's below D = 8; 1: 4 x 3; 2: 6 x 2, the
      // kernel's from D = 8; 3: 8 x 2; 4: 6 x 2 with the queries' coordinates read as vectors)
      if (param == 1) return phase_a_step<T, 4, 3>(iters);
      if (param == 2) return phase_a_step<T, 6, 2>(iters);
      if (param == 3) return phase_a_step<T, 8, 2>(iters);
      if (param == 4) return phase_a_step<T, 6, 2, true>(iters);
      return phase_a_step<T, 4, 2>(iters);
    case kClock: {
      // kChains dependent one-cycle integer additions per step: steps x kChains / seconds is
      // the core's clock (the rates above divided by it are per-cycle throughputs)
#if defined(__x86_64__)
      uint64_t x = 0;
      for (int64_t it = 0; it < iters; ++it) {
#define PF_STEP(i) __asm__ volatile("add $1, %0" : "+r"(x));
        PF_REP(PF_STEP)
#undef PF_STEP
      }
      __asm__ volatile("" : : "r"(x));
      break;
#else
      return -1;
#endif
    }
    case kStore:
    case kLoadStore: {
      // twelve chains, each storing its vector every step to its own line of a 12-line ring;
      // load+store adds three loads per chain, from 36 lines of the same page kept clear of
      // the stores' address bits 0-11 (a load that shares them with a store still in flight
      // waits for it: 4K aliasing, measured 2-3 times slower)
      char* raw = (char*)aligned_buffer(2 * 4096);
      if (!raw) return -1;
      char* page = raw + (4096 - ((uintptr_t)raw & 4095)) % 4096;
      T* st = (T*)page;                 // bytes 0-767 of the page
      const T* lp = (const T*)(page + 1024);  // bytes 1024-3327
      for (int64_t i = 0; i < 12 * W; ++i) st[i] = (T)0;
      for (int64_t i = 0; i < 36 * W; ++i) ((T*)lp)[i] = (T)(1e-3 * (double)(i % 17));
#define PF_DECL(i) V a##i = vbroadcast<T>((T)(0.5 + 0.01 * i));
      PF_REP(PF_DECL)
#undef PF_DECL
      const bool with_loads = op == kLoadStore;
      per_iter = with_loads ? 4 * kChains : kChains;
      for (int64_t it = 0; it < iters; ++it) {
        T* sp = st;
        const T* l = lp;
        __asm__ volatile("" : "+r"(sp), "+r"(l));
        if (with_loads) {
#define PF_STEP(i)                                                              \
  {                                                                             \
    V l0 = vload<T>(l + (3 * i) * W), l1 = vload<T>(l + (3 * i + 1) * W);      \
    V l2 = vload<T>(l + (3 * i + 2) * W);                                       \
    PF_OPAQUE(l0);                                                              \
    PF_OPAQUE(l1);                                                              \
    PF_OPAQUE(l2);                                                              \
    vstore<T>(sp + (i) * W, a##i);                                              \
  }
          PF_REP(PF_STEP)
#undef PF_STEP
        } else {
#define PF_STEP(i) vstore<T>(sp + (i) * W, a##i);
          PF_REP(PF_STEP)
#undef PF_STEP
        }
        PF_REP(PF_HIDE_A)
      }
      free(raw);
      break;
    }
    case kLoopA:
      return embed ? loop_distance<T, Geometry<T>::QB, false, true>(iters)
                   : loop_distance<T, Geometry<T>::QB, false, false>(iters);
    case kLoopAGrad:
      return embed ? loop_distance<T, Geometry<T>::QBb, true, true>(iters)
                   : loop_distance<T, Geometry<T>::QBb, true, false>(iters);
    case kLoopC:
      return loop_accumulate<T, false>(iters);
    case kLoopCGrad:
      return loop_accumulate<T, true>(iters);
    case kMax:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return vmax<T>(a, b); });
      break;
    case kDiv:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return b / a; });
      break;
    case kSqrt:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return vsqrt<T>(a); });
      break;
    case kSqrtNewton:
      chains<T, false>(iters, (T)0.5, (T)0.01, [=](V a, int) { return vsqrt_newton<T>(a); });
      break;
    case kExp2:
      chains<T, true>(iters, (T)-3.3, (T)-0.7, [=](V a, int) { return vexp2<T>(a); });
      break;
    case kLog2:
      chains<T, true>(iters, (T)0.3, (T)1.7, [=](V a, int) { return vlog2<T>(a); });
      break;
    case kPowWeight: {
      const PowerPlan<T> plan = power_plan<T>(2.0 * param, 0, 1.0, 1.0);
      chains<T, true>(iters, (T)0.9, (T)-0.05,
                      [&](V a, int) { return power_weight<T>(a, (T)1, plan); });
      break;
    }
    case kLoadFma: {
      // a += y[k] * x_i: a vector load shared by the chains and a broadcast scalar operand
      // per chain, as in phase A and C (64 vectors: L1-resident)
      alignas(64) T y[64 * W];
      alignas(64) T x[kChains];
      for (int i = 0; i < 64 * W; ++i) y[i] = (T)(1e-3 * (i % 17));
      for (int i = 0; i < kChains; ++i) x[i] = (T)(1e-2 * i);
      const T* yp = y;
      const T* xp = x;
      __asm__ volatile("" : "+r"(yp), "+r"(xp));
      int64_t k = 0;
      chains<T, false>(iters, (T)0.5, (T)0.01, [&](V a, int i) {
        const V yv = vload<T>(yp + ((k + (i == 0)) & 63) * W);
        if (i == kChains - 1) ++k;
        return a + yv * xp[i];
      });
      break;
    }
    default:
      return -1;
  }
  return per_iter * iters;
}

template <typename T>
double pipe_rate_impl(int op, int64_t iters, int threads, double param) {
  if (op < 0 || op >= kNumOps || iters < 1) return -1.0;
  if (run_op<T>(op, 1, param) < 0) return -1.0;  // not available here
  double t0 = 0.0, t1 = 0.0;
  int64_t ops_per_thread = 0;
  int team = 1;
#pragma omp parallel num_threads(threads)
  {
    run_op<T>(op, iters / 16 + 1, param);  // warm-up: clocks, caches, page faults
#pragma omp barrier
#pragma omp single
    t0 = now_seconds();  // implicit barrier after single
    const int64_t n = run_op<T>(op, iters, param);
#pragma omp barrier
#pragma omp single
    {
      t1 = now_seconds();
      ops_per_thread = n;
#ifdef _OPENMP
      team = omp_get_num_threads();
#endif
    }
  }
  return (double)ops_per_thread * (double)team / (t1 - t0);
}

}  // namespace

// Vector operations per second of `threads` threads running operation `op` (kOpNames), or -1
// for an unknown operation; `param` is p/2 for pow_weight.
double pipe_rate(int op, int64_t iters, int threads, double param, bool is_double) {
  return is_double ? pipe_rate_impl<double>(op, iters, threads, param)
                   : pipe_rate_impl<float>(op, iters, threads, param);
}

int pipe_op_count() { return kNumOps; }
const char* pipe_op_name(int op) { return op >= 0 && op < kNumOps ? kOpNames[op] : ""; }
int vector_bytes() { return kVecBytes; }

}  // namespace PF_ISA_NS
}  // namespace poissonflow
