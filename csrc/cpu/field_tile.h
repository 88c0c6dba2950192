// The field of one tile of queries against all charges: the inner loop that the forward kernel,
// the fused flow steps and (in its phase-A form) the backward kernel share.
//
// Layout. Charges are packed once per call into yT, tile by tile: the tile of charges
// [j0, j0 + w) is a contiguous w x ... block holding D rows of w values (lanes over charges, w the
// tile width CT, less for the last tile, always a multiple of the charge block), and lw (Bp,
// log2 of the weights, kNoCharge for padding and zero weights). Contiguous tiles keep a tile's
// D rows on few pages (a global D x B array would put every row 4 B bytes apart: one TLB entry
// per dimension, measured 30% slower at D = 513, B = 8192).
// Vectorising over charges rather than dimensions means no dimension padding, so D = 3 and
// D = 129 run the same code without waste.
//
// Per charge tile (CT charges) the work is three phases (the formulas of scores, online softmax
// and finalisation are common/field_numerics.h's, shared with the CUDA kernels):
//   A  r2 by direct differences (never |x|^2 + |y|^2 - 2 x.y: docs/DESIGN.md, "The field operator"), QB
//      queries x CB charge vectors held in registers, then s = log2 w - (p/2) log2(max(r2 +
//      eps2, tiny)).
//   B  online softmax in base 2 with a lazy maximum: the running max m moves only when a tile
//      exceeds it by more than kTau, so p = 2^(s - m) <= 2^kTau and rescaling is rare.
//   C  acc += p * (y - x), again by differences: x - mu would cancel catastrophically when a
//      query sits next to a charge far from the origin.
// All sums run in a fixed order inside one thread, so results do not depend on thread count.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common/field_args.h"
#include "common/field_numerics.h"
#include "power_form.h"
#include "simd.h"

namespace poissonflow {
namespace PF_ISA_NS {

// The shared numerics (sentinels, floor, online softmax, pair gradient: common/field_numerics.h,
// docs/DESIGN.md, "The field operator") evaluated on SIMD vectors of charges: the math policy they are
// instantiated with here. fma is a * b + c: -ffp-contract=fast makes it one instruction where
// the ISA has FMA, and the generic copy gets a multiply and an add instead of a libm call.
template <typename T>
struct VecMath {
  typedef T S;
  typedef VecT<T> V;
  static inline V exp2(V a) { return vexp2<T>(a); }
  static inline V log2(V a) { return vlog2<T>(a); }
  static inline V fma(V a, V b, V c) { return a * b + c; }
  static inline V max(V a, V b) { return vmax<T>(a, b); }
  template <class Mask>
  static inline V select(Mask m, V a, V b) { return m ? a : b; }
  static inline V splat(T a) { return vbroadcast<T>(a); }
};

// Tile geometry for this ISA and element type.
template <typename T>
struct Geometry {
  static constexpr int W = VecTraits<T>::W;
  static constexpr int QBb = 4;            // backward phase A': queries per register block
#if defined(PF_ISA_AVX512)
  // phase A: queries per register block. 6 x 2 gives 12 independent r2 sums: with 4 x 2 the
  // 8 sums' FMA latency held the loop to about 2.9 of the 4 vector instructions per cycle two
  // FMA and two add pipes issue (bench/ceiling.py's phaseA micro-benchmark; 6 x 2: 3.65).
  static constexpr int QB = 6;
  static constexpr int QBs = 4;            // the same below kSmallD dimensions (measured faster:
                                           // the per-pair work dominates there)
  static constexpr int CB = 2;             // phase A: charge vectors per register block
  static constexpr int QC = 2;             // phase C: queries per register block
  static constexpr int KB = 6;             // phase C: dimensions per register block
#else
  static constexpr int QB = 4;
  static constexpr int QBs = 4;
  static constexpr int CB = 2;
  static constexpr int QC = 2;
  static constexpr int KB = 3;
#endif
  static constexpr int kSmallD = 8;
  // wide rows (D above this): a charge tile of twice the bytes, and phase A prefetching the
  // charges' rows kWideAhead steps on (tile_shape, scores_tile). At D = 513 the narrow rows'
  // budget gave 96 charges a tile, so phase C's blocks ran 6 charge vectors between loading
  // and storing their accumulators (12% of the call); twice the bytes halve that, but phase A
  // then streams the larger tile from L3 behind the hardware's prefetch (its loop 20% slower)
  // unless told the rows ahead: both, N = B = 4096, one thread, 416 -> 385 ms (16, 24 and 32
  // rows ahead alike, 8 a little slower, 4 no gain). Narrower rows keep their tiles and bits.
  static constexpr int kWideD = 256;
  static constexpr int kWideAhead = 24;
  // phase A's query block at dimension D
  static constexpr int qb(int64_t D) { return D < kSmallD ? QBs : QB; }
  static constexpr int CT_MAX = 16 * W;    // charges per tile, at most
  static constexpr int kChargeAlign = CB * W;  // Bp and every tile width are multiples of this
};

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

static inline void* aligned_buffer(size_t bytes) {
  size_t n = (size_t)round_up((int64_t)(bytes ? bytes : 64), 64);
  return aligned_alloc(64, n);
}

// Charges in the kernel layout.
template <typename T>
struct Packed {
  T* yT = nullptr;  // tiles of D x width values (see the layout note above)
  T* lw = nullptr;  // (Bp,)
  T* g = nullptr;   // (Bp,) power form: (w_j / w_max)^(2/p), 0 for zero weights and padding
  int64_t B = 0, Bp = 0, D = 0, CT = 0;
  double log_wsum = 0.0;  // natural log of the sum of weights
  double log2_wmax = 0.0;  // power form: log2 of the largest weight

  bool allocate(int64_t B_, int64_t D_, int64_t CT_) {
    B = B_;
    D = D_;
    CT = CT_;
    Bp = round_up(B_, Geometry<T>::kChargeAlign);
    yT = (T*)aligned_buffer(sizeof(T) * (size_t)(D * Bp));
    lw = (T*)aligned_buffer(sizeof(T) * (size_t)Bp);
    g = (T*)aligned_buffer(sizeof(T) * (size_t)Bp);
    return yT && lw && g;
  }
  void release() {
    free(yT);
    free(lw);
    free(g);
    yT = lw = g = nullptr;
  }
  // Width of the tile starting at charge j0 (a multiple of CT), and the start of its rows.
  int64_t width(int64_t j0) const { return Bp - j0 < CT ? Bp - j0 : CT; }
  T* tile(int64_t j0) const { return yT + j0 * D; }
  // Position of (dimension k, charge j) in any array of this layout.
  int64_t index(int64_t k, int64_t j) const {
    const int64_t j0 = j / CT * CT;
    return j0 * D + k * width(j0) + (j - j0);
  }
};

// Transposes y (B, D) into the tiled layout, tile by tile: a work-sharing loop, called by every
// thread of the caller's parallel region (one region per kernel call: packing and sweep).
template <typename T>
static void pack_charge_tiles(const T* y, Packed<T>& pk) {
  const int64_t B = pk.B, Bp = pk.Bp, D = pk.D;
#pragma omp for schedule(static)
  for (int64_t j0 = 0; j0 < Bp; j0 += pk.CT) {
    const int64_t wdt = pk.width(j0);
    T* base = pk.tile(j0);
    // W x W blocks, transposed in registers where the block is whole (vtranspose_block; a
    // column-at-a-time scalar copy was 15-20% of a small call), element by element at the
    // edges: dimensions past the last multiple of W, and padding charges (zeros)
    constexpr int64_t kBlock = VecTraits<T>::W;
    for (int64_t c0 = 0; c0 < wdt; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < wdt ? c0 + kBlock : wdt;
      int64_t kv = 0;
      if (c1 - c0 == kBlock && j0 + c1 <= B)
        for (; kv + kBlock <= D; kv += kBlock)
          vtranspose_block<T>(y + (j0 + c0) * D + kv, D, base + kv * wdt + c0, wdt);
      for (int64_t k0 = kv; k0 < D; k0 += kBlock) {
        const int64_t k1 = k0 + kBlock < D ? k0 + kBlock : D;
        for (int64_t c = c0; c < c1; ++c) {
          if (j0 + c < B) {
            const T* yrow = y + (j0 + c) * D;
            for (int64_t k = k0; k < k1; ++k) base[k * wdt + c] = yrow[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) base[k * wdt + c] = (T)0;  // padding
          }
        }
      }
    }
  }
}

// log2 of the weights, and for the power form g_j = (w_j / w_max)^(2/p); the weight sum is
// accumulated in double in index order (serial: O(B)).
template <typename T>
static void pack_weights(const T* w, Packed<T>& pk, const PowerPlan<T>& plan) {
  const int64_t B = pk.B, Bp = pk.Bp;
  double wsum = 0.0;
  for (int64_t j = 0; j < B; ++j) {
    double wj = w ? (double)w[j] : 1.0;
    wsum += wj;
    pk.lw[j] = log2_weight<ScalarMath<T>>((T)wj);
  }
  for (int64_t j = B; j < Bp; ++j) pk.lw[j] = Limits<T>::kNoCharge;
  pk.log_wsum = log(wsum);
  pk.log2_wmax = 0.0;
  if (!plan.enabled) return;
  pk.log2_wmax = log2(plan.w_max);
  for (int64_t j = 0; j < B; ++j) {
    const double wj = w ? (double)w[j] : 1.0;
    pk.g[j] = wj > 0.0 ? (T)(w ? pow(wj / plan.w_max, 1.0 / plan.half_p) : 1.0) : (T)0;
  }
  for (int64_t j = B; j < Bp; ++j) pk.g[j] = (T)0;
}

// Tile shape (QT queries x CT charges), chosen so that one tile's working set stays in a 1 MiB
// L2: the charges' slice of yT (D x CT) within 256 KiB and the lane accumulator (QT x D x W)
// within 512 KiB. Large QT re-uses each yT slice (streamed from L3) for more queries; large CT
// amortises the accumulator's read-modify-write over more charges. D = 129 float: 32 x 256;
// D = 513: 16 x 96 (a fixed 256-charge tile would have left room for only 4 queries).
template <typename T>
struct TileShape {
  int QT, CT;
  int blk;  // QT is a multiple of it
};

// blk: QT is a multiple of it (every register block of the kernel's loops divides it): the
// forward's and the flow's lcm(QB, QC) by default; the backward passes its own.
template <typename T>
static inline TileShape<T> tile_shape(int64_t D, int blk = 0) {
  typedef Geometry<T> G;
  const int64_t d = D > 0 ? D : 1, s = (int64_t)sizeof(T);
  const int64_t charge_bytes = (d > G::kWideD ? 512 : 256) * 1024;
  int64_t ct = charge_bytes / (d * s) / G::kChargeAlign * G::kChargeAlign;
  if (ct > G::CT_MAX) ct = G::CT_MAX;
  if (ct < G::kChargeAlign) ct = G::kChargeAlign;
  int64_t qt = (512 * 1024) / (s * d * G::W);
  if (qt > 32) qt = 32;
  if (blk <= 0) {
    const int qb = G::qb(D);
    blk = qb % G::QC == 0 ? qb : qb * G::QC;  // QC is 2: the lcm
  }
  qt = qt / blk * blk;
  if (qt < blk) qt = blk;
  return TileShape<T>{(int)qt, (int)ct, blk};
}

// The tile height for a call of N queries on `threads` threads: shape.QT or a smaller multiple
// of shape.blk. A tile computes all its QT rows, padding included, and a thread computes whole
// tiles, so a call of a few tiles per thread pays for the last tile's padding and for the thread
// left a tile short: the learned field's targets (128 queries at D = 128) made 5 tiles of 30 on
// 2 threads, 90 rows on the busier thread for 64 rows of work each. The height chosen minimises
// the busier thread's rows plus one per tile (a tile's own set-up and finalisation: measured at
// less than a row's work at that size, so it only breaks ties towards fewer tiles); large calls
// keep shape.QT. Rows are independent, so results do not depend on the height.
template <typename T>
static inline TileShape<T> balance_tiles(TileShape<T> shape, int64_t N, int threads) {
  const int64_t nth = threads > 1 ? threads : 1;
  int64_t best_cost = -1;
  int best = shape.QT;
  for (int qt = shape.QT; qt >= shape.blk; qt -= shape.blk) {
    const int64_t per_thread = ((N + qt - 1) / qt + nth - 1) / nth;
    const int64_t cost = per_thread * (qt + 1);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = qt;
    }
  }
  shape.QT = best;
  return shape;
}

// The lane sums of one row of a lane accumulator: out[k] = the sum of the W lanes at
// acc + at(k), for k < D. Blocks of W rows are gathered and reduced together (vhsum_block).
template <typename T, typename At>
static inline void row_lane_sums(const T* acc, At at, int64_t D, T* out) {
  constexpr int W = VecTraits<T>::W;
  int64_t k = 0;
  for (; k + W <= D; k += W) {
    alignas(64) T rows[W * W];
    for (int i = 0; i < W; ++i) vstore<T>(rows + i * W, vload<T>(acc + at(k + i)));
    vhsum_block<T>(rows, out + k);
  }
  for (; k < D; ++k) out[k] = vhsum<T>(vload<T>(acc + at(k)));
}

// Per-thread scratch for one query tile.
template <typename T>
struct TileScratch {
  static constexpr int W = VecTraits<T>::W;
  int QT = 0;          // queries per tile
  int CT = 0;          // charges per tile
  int64_t D = 0;
  T* xt = nullptr;     // (QT, D) the tile's queries
  T* e2 = nullptr;     // (QT,) softening squared
  int64_t* excl = nullptr;  // (QT,) excluded charge or -1
  T* S = nullptr;      // (QT, CT) scores, then probabilities
  T* acc = nullptr;    // lane partial sums of p * (y - x), QT x D x W in acc_index's order
  T* lvec = nullptr;   // (QT, W) lane partial sums of p
  T* m = nullptr;      // (QT,) running max of scores (log2); power form: the reference Q
  T* m_inv = nullptr;  // (QT,) power form: 1 / Q, set with Q (read only while Q > 0)
  T* out_v = nullptr;  // (QT, D) field of the tile
  T* out_lse = nullptr;  // (QT,) log-sum-exp in log2 units (-inf: no charge)
  bool embed = false;  // phase A with broadcast memory operands (simd.h vsub_broadcast)

  // Where (query q, dimension k)'s W lanes sit in acc: dimension-block major, the block of
  // phase C's KB dimensions that holds k first, then the query, then k within the block (the
  // last block holds the D mod KB remaining dimensions). Phase C sweeps the blocks outside and
  // the query pairs inside, so it reads and writes acc as one sequential stream that the
  // hardware prefetchers follow; a query-major (q, k) layout put each pair's accumulators
  // D x W apart from the next pair's.
  int64_t acc_index(int q, int64_t k) const {
    constexpr int KB = Geometry<T>::KB;
    const int64_t k0 = k / KB * KB;
    const int64_t bw = D - k0 < KB ? D - k0 : KB;
    return (k0 * QT + (int64_t)q * bw + (k - k0)) * W;
  }
  // Row q's accumulators and weight sum times alpha (the online maximum moved).
  void rescale_row(int q, T alpha) {
    for (int64_t k = 0; k < D; ++k) {
      T* a = acc + acc_index(q, k);
      vstore<T>(a, vload<T>(a) * alpha);
    }
    vstore<T>(lvec + (int64_t)q * W, vload<T>(lvec + (int64_t)q * W) * alpha);
  }

  bool allocate(TileShape<T> shape, int64_t D_) {
    QT = shape.QT;
    CT = shape.CT;
    D = D_;
    xt = (T*)aligned_buffer(sizeof(T) * QT * D);
    e2 = (T*)aligned_buffer(sizeof(T) * QT);
    excl = (int64_t*)aligned_buffer(sizeof(int64_t) * QT);
    S = (T*)aligned_buffer(sizeof(T) * QT * CT);
    acc = (T*)aligned_buffer(sizeof(T) * QT * D * W);
    lvec = (T*)aligned_buffer(sizeof(T) * QT * W);
    m = (T*)aligned_buffer(sizeof(T) * QT);
    m_inv = (T*)aligned_buffer(sizeof(T) * QT);
    out_v = (T*)aligned_buffer(sizeof(T) * QT * D);
    out_lse = (T*)aligned_buffer(sizeof(T) * QT);
    return xt && e2 && excl && S && acc && lvec && m && m_inv && out_v && out_lse;
  }
  void release() {
    free(xt); free(e2); free(excl); free(S); free(acc); free(lvec); free(m); free(m_inv);
    free(out_v); free(out_lse);
    xt = e2 = S = acc = lvec = m = m_inv = out_v = out_lse = nullptr;
    excl = nullptr;
  }
};

// The distance loop shared by the forward (phase A) and the backward (phase A'): for QB queries
// (rows xq[q]) x CB charge vectors (columns of the tile at yk, rows ld apart) it sums
// r2 = |x - y|^2 by direct differences into acc and, with kGrad, gd = g.(x - y) = -g.d with
// g rows gq[q]. The backward recomputes the softmax weights from the forward's log-sum-exp, so
// both must form r2 with exactly this code (bit-identical sums).
//
// r2 is summed in blocks of kSumBlock dimensions, each block added to the total: a float32
// running sum over D = 300 terms has a rounding error ~sqrt(D/3) ulp of r2, which p/2 in the
// exponent turns into 3e-5 relative error of the weights; blocking cuts it about fourfold.
//
// kAhead > 0: each step prefetches the charge rows kAhead steps on (wide rows: the tile's rows
// then stream from L3, and the hardware's prefetch falls behind; docs/performance.md, "Targets").
template <typename T, int QB, int CB, bool kGrad, bool kEmbed, int kAhead = 0>
static inline void distance_block(const T* const* xq, const T* const* gq, const T* yk, int64_t ld,
                                  int64_t D, VecT<T> (&acc)[QB][CB], VecT<T> (&gd)[QB][CB]) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  constexpr int64_t kSumBlock = 16;
  for (int q = 0; q < QB; ++q)
    for (int c = 0; c < CB; ++c) acc[q][c] = gd[q][c] = V{};
  for (int64_t k0 = 0; k0 < D; k0 += kSumBlock) {
    const int64_t k1 = k0 + kSumBlock < D ? k0 + kSumBlock : D;
    V part[QB][CB];
    for (int q = 0; q < QB; ++q)
      for (int c = 0; c < CB; ++c) part[q][c] = V{};
    for (int64_t k = k0; k < k1; ++k, yk += ld) {
      if constexpr (kAhead > 0)
        for (int c = 0; c < CB; ++c) __builtin_prefetch(yk + kAhead * ld + c * W, 0, 3);
      V y[CB];
      for (int c = 0; c < CB; ++c) y[c] = vload<T>(yk + c * W);
      for (int q = 0; q < QB; ++q) {
        for (int c = 0; c < CB; ++c) {
          V d = vsub_broadcast<T, kEmbed>(y[c], xq[q] + k);
          part[q][c] += d * d;
          if (kGrad) gd[q][c] = vfnmadd_broadcast<T, kEmbed>(d, gq[q] + k, gd[q][c]);
        }
      }
    }
    for (int q = 0; q < QB; ++q)
      for (int c = 0; c < CB; ++c) acc[q][c] += part[q][c];
  }
}

// Phase A for QB queries x CB charge vectors starting at charge j (absolute) and query row q0:
// scores s = log2 w - (p/2) log2(max(r2 + eps2, tiny)) into S, or with kPower the power form's
// q = g / max(r2 + eps2, tiny) (power_form.h). Always inlined: compiled on its own, GCC kept
// the 12 running r2 sums in memory, 12 stores to the stack after every 16-dimension block
// (docs/performance.md, "Zen 4"); inlined into scores_tile they stay in registers.
template <typename T, int QB, int CB, bool kPower, bool kEmbed, int kAhead = 0>
__attribute__((always_inline)) static inline void scores_block(const TileScratch<T>& sc,
                                                              const Packed<T>& pk,
                                                              const T* ytile, int64_t ld, int q0,
                                                              int64_t j, int col, T half_p) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  const int64_t D = pk.D;
  const int CT = sc.CT;
  V acc[QB][CB], unused[QB][CB];
  const T* xq[QB];
  for (int q = 0; q < QB; ++q) xq[q] = sc.xt + (int64_t)(q0 + q) * D;
  distance_block<T, QB, CB, false, kEmbed, kAhead>(xq, xq, ytile + col, ld, D, acc, unused);
  // The rows' softening and the score rows' addresses read once, before any store: a store of
  // floats may alias sc.e2, and GCC re-read it after every store
  T e2[QB];
  T* srow[QB];
  for (int q = 0; q < QB; ++q) {
    e2[q] = sc.e2[q0 + q];
    srow[q] = sc.S + (int64_t)(q0 + q) * CT + col;
  }
  for (int c = 0; c < CB; ++c) {
    if constexpr (kPower) {
      const V g = vload<T>(pk.g + j + c * W);
      for (int q = 0; q < QB; ++q) {
        const V r2 = vmax<T>(acc[q][c] + e2[q], vbroadcast<T>(Limits<T>::kTiny));
        vstore<T>(srow[q] + c * W, g / r2);
      }
    } else {
      const V lw = vload<T>(pk.lw + j + c * W);
      for (int q = 0; q < QB; ++q) {
        const V s = pair_score<VecMath<T>>(acc[q][c] + e2[q], lw, half_p, Limits<T>::kTiny);
        vstore<T>(srow[q] + c * W, s);
      }
    }
  }
}

// Phase A's QB x CB register blocks over the tile's QT queries and the charge tile at j0 (nvec
// charge vectors); kAhead: distance_block's prefetch.
template <typename T, int QB, bool kPower, bool kEmbed, int kAhead = 0>
__attribute__((always_inline)) static inline void scores_blocks(const TileScratch<T>& sc,
                                                               const Packed<T>& pk,
                                                               const T* ytile, int64_t ld,
                                                               int64_t j0, int nvec, T half_p) {
  typedef Geometry<T> G;
  constexpr int W = G::W;
  for (int q0 = 0; q0 < sc.QT; q0 += QB)
    for (int c0 = 0; c0 < nvec; c0 += G::CB)
      scores_block<T, QB, G::CB, kPower, kEmbed, kAhead>(sc, pk, ytile, ld, q0,
                                                         j0 + (int64_t)c0 * W, c0 * W, half_p);
}

// Phase A for the tile's QT queries over the charge tile at j0 (nvec charge vectors): the
// block shape by D (Geometry::qb), and the wide rows' prefetch.
template <typename T, bool kPower, bool kEmbed>
static void scores_tile(const TileScratch<T>& sc, const Packed<T>& pk, const T* ytile, int64_t j0,
                        int nvec, T half_p) {
  typedef Geometry<T> G;
  const int64_t ld = pk.width(j0);
  if (pk.D < G::kSmallD)
    scores_blocks<T, G::QBs, kPower, kEmbed>(sc, pk, ytile, ld, j0, nvec, half_p);
  else if (pk.D <= G::kWideD)
    scores_blocks<T, G::QB, kPower, kEmbed>(sc, pk, ytile, ld, j0, nvec, half_p);
  else
    scores_blocks<T, G::QB, kPower, kEmbed, G::kWideAhead>(sc, pk, ytile, ld, j0, nvec, half_p);
}

// Phase C for QC queries x KBr dimensions starting at dimension k0, over nvec charge vectors.
template <typename T, int QC, int KBr>
static inline void accumulate_block(TileScratch<T>& sc, const Packed<T>& pk, const T* ytile,
                                    int64_t ld, int q0, int64_t k0, int nvec) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  const int64_t D = pk.D;
  const int CT = sc.CT;
  V acc[QC][KBr];
  V xs[QC][KBr];
  // the block's QC x KBr accumulators, consecutive from its first (acc_index's order)
  T* const ablk = sc.acc + sc.acc_index(q0, k0);
  for (int q = 0; q < QC; ++q)
    for (int kk = 0; kk < KBr; ++kk) {
      acc[q][kk] = vload<T>(ablk + (q * KBr + kk) * W);
      // a broadcast load (x - 0 is x for every x, -0 included), not a scalar load kept aside
      xs[q][kk] = sc.xt[(int64_t)(q0 + q) * D + k0 + kk] - V{};
    }
  const T* prow[QC];
  for (int q = 0; q < QC; ++q) prow[q] = sc.S + (int64_t)(q0 + q) * CT;
  const T* ybase = ytile + k0 * ld;
  // nvec >= 1 (tiles are never empty): with the loop's zero-trip path GCC kept a second copy of
  // the accumulators, spilled four of them and shuffled the rest around the loop; without that
  // path it re-read each y for its second query (14 loads a step instead of 8) until y was held
  int c = 0;
  do {
    V p[QC];
    // held (vhold): otherwise GCC folded each p load into its KBr FMAs as a memory operand,
    // in the 4 x 3 tail block 15 loads a step instead of 7 (12 cycles of pipe work, and Zen 4
    // loads one 512-bit vector a cycle): phase C at D = 3 is that block alone
    for (int q = 0; q < QC; ++q) p[q] = vhold<T>(vload<T>(prow[q] + c * W));
    for (int kk = 0; kk < KBr; ++kk) {
      const V y = vhold<T>(vload<T>(ybase + kk * ld + c * W));
      for (int q = 0; q < QC; ++q) acc[q][kk] += p[q] * (y - xs[q][kk]);
    }
  } while (++c < nvec);
  for (int q = 0; q < QC; ++q)
    for (int kk = 0; kk < KBr; ++kk)
      vstore<T>(ablk + (q * KBr + kk) * W, acc[q][kk]);
}

template <typename T, int QC, int KBr>
static inline void accumulate_tail(TileScratch<T>& sc, const Packed<T>& pk, const T* ytile,
                                   int64_t ld, int q0, int64_t k0, int nvec, int rem) {
  if constexpr (KBr > 0) {
    if (rem == KBr)
      accumulate_block<T, QC, KBr>(sc, pk, ytile, ld, q0, k0, nvec);
    else
      accumulate_tail<T, QC, KBr - 1>(sc, pk, ytile, ld, q0, k0, nvec, rem);
  }
}

// Phase C for the tile's QT queries over one charge tile (rows ld apart, nvec charge vectors).
// Dimension blocks outside, query pairs inside: the block's KB rows of yT (KB x CT) stay in L1
// while every query pair reads them.
template <typename T>
static inline void accumulate_tile(TileScratch<T>& sc, const Packed<T>& pk, const T* ytile,
                                   int64_t ld, int nvec) {
  typedef Geometry<T> G;
  const int64_t D = pk.D;
  int64_t k0 = 0;
  for (; k0 + G::KB <= D; k0 += G::KB)
    for (int q0 = 0; q0 < sc.QT; q0 += G::QC)
      accumulate_block<T, G::QC, G::KB>(sc, pk, ytile, ld, q0, k0, nvec);
  if (k0 < D) {
    const int rem = (int)(D - k0);
    int q0 = 0;
    // A tail of at most KB / 2 dimensions takes twice the queries, so that its loop still
    // carries QC x KB accumulators (the same sums in the same order: the same bits)
    if (2 * rem <= G::KB)
      for (; q0 + 2 * G::QC <= sc.QT; q0 += 2 * G::QC)
        accumulate_tail<T, 2 * G::QC, G::KB / 2>(sc, pk, ytile, ld, q0, k0, nvec, rem);
    for (; q0 < sc.QT; q0 += G::QC)
      accumulate_tail<T, G::QC, G::KB - 1>(sc, pk, ytile, ld, q0, k0, nvec, rem);
  }
}

// The power form's weights of one row's nvec vectors of q in place, their sum added to l
// (returned), with p/2's quarters known at compile time (vpow_plan_n). kGroup vectors at a time
// (power_weight_n: independent squaring chains side by side); nvec is a multiple of the charge
// block CB, and l adds the weights in the same order as one vector at a time.
// kNewton (plan.newton_sqrt: 1 <= p/2 < 5): vectors 1 and 3 of each group take their square
// roots on the FMA pipes (vsqrt_newton), 0 and 2 and the run's remainder on the divider
// (power_form.h, vpow_plan_n). Which vector does is fixed by its position in the charge tile,
// whose width depends on D only, so no result depends on the thread or on the query tiles.
template <typename T, int kQuarters, bool kNewton>
__attribute__((always_inline)) static inline VecT<T> power_row_run(T* srow, int nvec, T inv_q,
                                                                   const PowerPlan<T>& plan,
                                                                   VecT<T> l) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  constexpr int kGroup = 4;
  constexpr unsigned kMask = kNewton ? 0xAu : 0u;  // vectors 1 and 3
  int c = 0;
  for (; c + kGroup <= nvec; c += kGroup) {
    V p[kGroup];
    for (int i = 0; i < kGroup; ++i) p[i] = vload<T>(srow + (c + i) * W);
    power_weight_n<T, kGroup, kQuarters, kMask>(p, inv_q, plan);
    for (int i = 0; i < kGroup; ++i) {
      vstore<T>(srow + (c + i) * W, p[i]);
      l += p[i];
    }
  }
  for (; c < nvec; ++c) {
    V p[1] = {vload<T>(srow + c * W)};
    power_weight_n<T, 1, kQuarters>(p, inv_q, plan);
    vstore<T>(srow + c * W, p[0]);
    l += p[0];
  }
  return l;
}

// Phase B of the power form for one row (power_form.h): the lazy reference update in q units
// (the log domain's kTau rule: Q moves only when a tile beats it by 2^(kTau / (p/2))), the
// rescaling, and the weights (q / Q)^(p/2), all 0 while the row has no charge yet.
// Always inlined: called once per row and tile, out of line it cost D = 3 about 7% of its time.
template <typename T>
__attribute__((always_inline)) static inline void power_row_weights(TileScratch<T>& sc, int q,
                                                                    int nvec,
                                                                    const PowerPlan<T>& plan) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  T* srow = sc.S + (int64_t)q * sc.CT;
  V mx = vload<T>(srow);
  for (int c = 1; c < nvec; ++c) mx = vmax<T>(mx, vload<T>(srow + c * W));
  const T tile_max = vhmax<T>(mx);
  const T Q = sc.m[q];
  if (tile_max > (T)0 && (!(Q > (T)0) || tile_max > Q * plan.tau_factor)) {
    if (Q > (T)0) {  // rescale what was accumulated against the old reference
      const T alpha = (T)power_ratio((double)Q, (double)tile_max, plan.half_p);
      sc.rescale_row(q, alpha);
    }
    sc.m[q] = tile_max;
    sc.m_inv[q] = (T)1 / tile_max;
  }
  if (!(sc.m[q] > (T)0)) {
    for (int c = 0; c < nvec; ++c) vstore<T>(srow + c * W, V{});
    return;
  }
  // 1 / Q kept with Q, not divided per row and tile: the division waited on the divider behind
  // the previous row's square roots, and this row's roots on it, leaving the divider idle
  // between rows (phase B 8% slower from L1 at p = 33); Q moves on few tiles
  const T inv_q = sc.m_inv[q];
  V l = vload<T>(sc.lvec + (int64_t)q * W);
  // once per row: the weights' loop knows its square roots and where they run
  switch (plan.quarters + (plan.newton_sqrt ? 4 : 0)) {
    case 0: case 4: l = power_row_run<T, 0, false>(srow, nvec, inv_q, plan, l); break;
    case 1: l = power_row_run<T, 1, false>(srow, nvec, inv_q, plan, l); break;
    case 2: l = power_row_run<T, 2, false>(srow, nvec, inv_q, plan, l); break;
    case 3: l = power_row_run<T, 3, false>(srow, nvec, inv_q, plan, l); break;
    case 5: l = power_row_run<T, 1, true>(srow, nvec, inv_q, plan, l); break;
    case 6: l = power_row_run<T, 2, true>(srow, nvec, inv_q, plan, l); break;
    default: l = power_row_run<T, 3, true>(srow, nvec, inv_q, plan, l); break;
  }
  vstore<T>(sc.lvec + (int64_t)q * W, l);
}

// Field of the tile's first nq queries (sc.xt, sc.e2, sc.excl filled by the caller; rows nq..QT
// must hold finite copies). Writes sc.out_v (the field v = x - mu) and sc.out_lse (log2 units).
// kPower: the weights in power form (power_form.h, `plan`), else in the log domain.
template <typename T, bool kPower>
static void field_tile(TileScratch<T>& sc, const Packed<T>& pk, T half_p, int nq,
                       const PowerPlan<T>& plan) {
  typedef VecT<T> V;
  typedef Geometry<T> G;
  constexpr int W = G::W;
  const int QT = sc.QT;
  const int64_t D = pk.D, Bp = pk.Bp;
  const int CT = sc.CT;  // == pk.CT

  for (int q = 0; q < QT; ++q) {
    sc.m[q] = kPower ? (T)0 : Limits<T>::kNoCharge;
    vstore<T>(sc.lvec + (int64_t)q * W, V{});
  }
  for (int64_t i = 0; i < (int64_t)QT * D * W; ++i) sc.acc[i] = (T)0;

  for (int64_t j0 = 0; j0 < Bp; j0 += CT) {
    const int ncharges = (int)pk.width(j0);  // multiple of CB * W
    const int nvec = ncharges / W;
    const T* ytile = pk.tile(j0);
    // Phase A: scores.
    if (sc.embed)
      scores_tile<T, kPower, true>(sc, pk, ytile, j0, nvec, half_p);
    else
      scores_tile<T, kPower, false>(sc, pk, ytile, j0, nvec, half_p);
    // Excluded self-charges.
    for (int q = 0; q < QT; ++q) {
      const int64_t e = sc.excl[q];
      if (e >= j0 && e < j0 + ncharges)
        sc.S[(int64_t)q * CT + (e - j0)] = kPower ? (T)0 : Limits<T>::kNoCharge;
    }
    // Phase B: online softmax.
    for (int q = 0; q < QT; ++q) {
      if constexpr (kPower) {
        power_row_weights<T>(sc, q, nvec, plan);
        continue;
      }
      T* srow = sc.S + (int64_t)q * CT;
      V mx = vload<T>(srow);
      for (int c = 1; c < nvec; ++c) mx = vmax<T>(mx, vload<T>(srow + c * W));
      const T m_before = sc.m[q];
      T m = m_before;
      const T alpha = online_max_update<ScalarMath<T>>(m, vhmax<T>(mx));
      // The first real charge of a row finds its accumulators still zero: nothing to rescale.
      if (alpha != (T)1 && is_real_score(m_before)) {
        sc.rescale_row(q, alpha);
      }
      sc.m[q] = m;
      if (!is_real_score(m)) {
        for (int c = 0; c < nvec; ++c) vstore<T>(srow + c * W, V{});
        continue;
      }
      V l = vload<T>(sc.lvec + (int64_t)q * W);
      for (int c = 0; c < nvec; ++c) {
        const V p = online_weight<VecMath<T>>(vload<T>(srow + c * W), m);
        vstore<T>(srow + c * W, p);
        l += p;
      }
      vstore<T>(sc.lvec + (int64_t)q * W, l);
    }
    // Phase C: accumulate p * (y - x).
    accumulate_tile<T>(sc, pk, ytile, ncharges, nvec);
  }

  // Finalise: v = x - mu = -sum p (y - x) / sum p; lse = m + log2(sum p). A dead row (no
  // charge reaches it: all weights zero or its only charge excluded) has no field.
  for (int q = 0; q < nq; ++q) {
    const T l = vhsum<T>(vload<T>(sc.lvec + (int64_t)q * W));
    // power form: m holds Q, and lse2 = log2 w_max + (p/2) log2 Q + log2 l (in double)
    const bool dead = kPower ? !(l > (T)0) || !(sc.m[q] > (T)0) : row_is_dead(sc.m[q], l);
    T* vq = sc.out_v + (int64_t)q * D;
    row_lane_sums<T>(sc.acc, [&](int64_t k) { return sc.acc_index(q, k); }, D, vq);
    for (int64_t k = 0; k < D; ++k) vq[k] = field_from_acc(vq[k], l, dead);
    if constexpr (kPower)
      sc.out_lse[q] = dead ? (T)-INFINITY
                           : (T)(pk.log2_wmax + plan.half_p * log2((double)sc.m[q]) +
                                 log2((double)l));
    else
      sc.out_lse[q] = row_lse2(sc.m[q], l, dead);
  }
}

// Fills the tile's query rows [i0, i0 + nq) of x (rows past nq repeat the last one so that every
// lane stays finite), its softening and its excluded charges.
template <typename T>
static inline void load_query_tile(TileScratch<T>& sc, const FieldArgs& a, int64_t i0, int nq) {
  const T* x = (const T*)a.x;
  const T* e2r = (const T*)a.eps2_rows;
  const int64_t D = a.D;
  for (int q = 0; q < sc.QT; ++q) {
    const int64_t i = i0 + (q < nq ? q : nq - 1);
    memcpy(sc.xt + (int64_t)q * D, x + i * D, sizeof(T) * D);
    sc.e2[q] = e2r ? e2r[i] : (T)a.eps2;
    sc.excl[q] = (a.exclude && q < nq) ? a.exclude[i] : -1;
  }
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
