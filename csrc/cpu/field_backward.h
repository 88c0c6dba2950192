// Backward pass of the field (docs/DESIGN.md, "The field operator", "Gradients"), one fused sweep over
// (query tile, charge tile) items that recomputes the softmax weights from the forward's
// log-sum-exp (FlashAttention-2 style) and never stores an N x B quantity.
//
// Per item, with d = y - x formed once per (pair, dimension):
//   A'  r2 (the forward's blocked sum, so pi is recomputed from bit-identical r2) and gd = g.(x-y)
//   B'  the shared per-pair term (common/field_numerics.h, pair_gradient): pi, a = p gs / r2 and
//       (pi / w) h for dL/dw, lanes over charges, summed over the tile's rows
//   C'  t = a d;  dx_i += sum_j t  (lanes over charges, reduced per item);
//       dy_j -= sum_i (t + pi g_i)  (lanes over charges: no reduction needed)
//
// Determinism without atomics (field_cpu.cpp, backward_impl): query tiles are split into a fixed
// number of contiguous row groups that depends on the problem's sizes only; each group sums dy
// and dw into its own partial buffers, one thread per group, and the partials are added in group
// order at the end. When memory allows a single group, threads share it through a row pipeline
// (row i adds to charge tile j only after row i - 1 has), which keeps the same summation order.
// Either way every dx row is summed over charge tiles in increasing j and every dy column over
// query tiles in increasing i, whatever the number of threads. Memory: the packed charges, dy in
// the same packed layout (once per group), and per-thread tiles: O((N + B) D).
#pragma once

#include "field_tile.h"

namespace poissonflow {
namespace PF_ISA_NS {

template <typename T>
struct BackwardScratch {
  static constexpr int W = VecTraits<T>::W;
  int QT = 0;
  int CT = 0;
  int64_t D = 0;
  T* xt = nullptr;     // (QT, D) queries
  T* gt = nullptr;     // (QT, D) upstream gradient of v
  T* e2 = nullptr;     // (QT,)
  int64_t* excl = nullptr;
  T* lse2 = nullptr;   // (QT,) log-sum-exp in log2 units (+inf: dead row, every pi = 0)
  T* delta = nullptr;  // (QT,) g.v - gl
  T* inv_q = nullptr;  // (QT,) power form: 1 / Q of the row (0: dead row), power_form.h
  // One item's pair terms (backward_item), which the scratches of the query tiles a thread
  // sweeps together share (`owner`: the scratch that allocated them): an item uses them only
  // while it runs.
  T* R = nullptr;      // (QT, CT) r2 (unclamped + eps2)
  T* G = nullptr;      // (QT, CT) gd = g.(x - y)
  T* P = nullptr;      // (QT, CT) pi
  T* C = nullptr;      // (QT, CT) c = p gs / r2
  bool owner = false;
  T* accdx = nullptr;  // (QT, D, W)
  T* dx_sums = nullptr;  // (D,) one row's lane sums of accdx
  bool embed = false;    // phase A' with broadcast memory operands (simd.h vsub_broadcast)

  // share: a scratch whose pair terms this one uses (nullptr: its own)
  bool allocate(TileShape<T> shape, int64_t D_, const BackwardScratch* share = nullptr) {
    QT = shape.QT;
    CT = shape.CT;
    D = D_;
    xt = (T*)aligned_buffer(sizeof(T) * QT * D);
    gt = (T*)aligned_buffer(sizeof(T) * QT * D);
    e2 = (T*)aligned_buffer(sizeof(T) * QT);
    excl = (int64_t*)aligned_buffer(sizeof(int64_t) * QT);
    lse2 = (T*)aligned_buffer(sizeof(T) * QT);
    delta = (T*)aligned_buffer(sizeof(T) * QT);
    inv_q = (T*)aligned_buffer(sizeof(T) * QT);
    owner = share == nullptr;
    if (owner) {
      R = (T*)aligned_buffer(sizeof(T) * QT * CT);
      G = (T*)aligned_buffer(sizeof(T) * QT * CT);
      P = (T*)aligned_buffer(sizeof(T) * QT * CT);
      C = (T*)aligned_buffer(sizeof(T) * QT * CT);
    } else {
      R = share->R;
      G = share->G;
      P = share->P;
      C = share->C;
    }
    accdx = (T*)aligned_buffer(sizeof(T) * QT * D * W);
    dx_sums = (T*)aligned_buffer(sizeof(T) * D);
    return xt && gt && e2 && excl && lse2 && delta && inv_q && R && G && P && C && accdx &&
           dx_sums;
  }
  void release() {
    free(xt); free(gt); free(e2); free(excl); free(lse2); free(delta); free(inv_q);
    if (owner) {
      free(R); free(G); free(P); free(C);
    }
    free(accdx); free(dx_sums);
    xt = gt = e2 = lse2 = delta = inv_q = R = G = P = C = accdx = dx_sums = nullptr;
    excl = nullptr;
  }
};

// Phase A': r2 (the forward's distance_block, so bit-identical) and gd = g.(x - y).
template <typename T, int QB, int CB, bool kGrad, bool kEmbed>
static inline void backward_pairs_block(BackwardScratch<T>& sc, const Packed<T>& pk,
                                        const T* ytile, int64_t ld, int q0, int col) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  const int64_t D = pk.D;
  const int CT = sc.CT;
  V acc[QB][CB], gd[QB][CB];
  const T* xq[QB];
  const T* gq[QB];
  for (int q = 0; q < QB; ++q) {
    xq[q] = sc.xt + (int64_t)(q0 + q) * D;
    gq[q] = sc.gt + (int64_t)(q0 + q) * D;
  }
  distance_block<T, QB, CB, kGrad, kEmbed>(xq, gq, ytile + col, ld, D, acc, gd);
  for (int q = 0; q < QB; ++q)
    for (int c = 0; c < CB; ++c) {
      const int64_t off = (int64_t)(q0 + q) * CT + col + c * W;
      vstore<T>(sc.R + off, acc[q][c] + sc.e2[q0 + q]);
      vstore<T>(sc.G + off, gd[q][c]);
    }
}

// Phase A' for the tile's QT queries over one charge tile (nvec charge vectors, rows ld apart).
// ahead (ahead_lines cache lines, or none): memory that the next charge tile's phase C' will
// update, prefetched a few lines after each register block. Phase A' reads none of the dy
// partials, so their lines come from L3 here, beside its arithmetic, rather than in C'
// (backward_rows: the first of the swept rows' items of each tile asks for it).
//
// On avx512 a function of its own with everything inlined into it: inlined into backward_item,
// the shared-broadcast form's loop kept three of its g.(x - y) sums in memory (3 stores and 3
// reloads a step, docs/performance.md, "The loops alone"); here GCC keeps all of them in
// registers, the same instructions otherwise. On avx2 (16 registers) the inlined form spills
// less, so it stays.
#if defined(PF_ISA_AVX512)
#define PF_PAIRS_TILE_ATTR __attribute__((noinline, flatten))
#else
#define PF_PAIRS_TILE_ATTR
#endif
template <typename T, bool kEmbed>
PF_PAIRS_TILE_ATTR static void backward_pairs_tile(BackwardScratch<T>& sc, const Packed<T>& pk,
                                                   const T* ytile, int64_t ld, int nvec,
                                                   bool has_g, const char* ahead,
                                                   int64_t ahead_lines) {
  typedef Geometry<T> G;
  constexpr int W = G::W;
  const int64_t blocks = (int64_t)(sc.QT / G::QBb) * (nvec / G::CB);
  const int64_t per_block = (ahead_lines + blocks - 1) / blocks;
  int64_t line = 0;
  for (int q0 = 0; q0 < sc.QT; q0 += G::QBb)
    for (int c0 = 0; c0 < nvec; c0 += G::CB) {
      for (const int64_t end = line + per_block; line < end && line < ahead_lines; ++line)
        __builtin_prefetch(ahead + line * 64, 1, 3);
      if (has_g)
        backward_pairs_block<T, G::QBb, G::CB, true, kEmbed>(sc, pk, ytile, ld, q0, c0 * W);
      else
        backward_pairs_block<T, G::QBb, G::CB, false, kEmbed>(sc, pk, ytile, ld, q0, c0 * W);
    }
}

// Phase C': dx and dy for QC queries x KBr dimensions over nvec charge vectors.
template <typename T, int QC, int KBr, bool kDx, bool kDy, bool kGrad>
static inline void backward_accumulate_block(BackwardScratch<T>& sc, const Packed<T>& pk,
                                             const T* ytile, T* dytile, int64_t ld, int q0,
                                             int64_t k0, int nvec) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  const int64_t D = pk.D;
  const int CT = sc.CT;
  V acc[QC][KBr];
  // The block's x and g values (2 QC KBr scalars), read inside the charge loop through a
  // pointer the compiler cannot see through: otherwise it hoists their 2 QC KBr broadcasts out
  // of the loop and, with the accumulators, runs out of vector registers (measured on AVX-512:
  // 75 spilled zmm loads and stores per iteration); as memory operands they are embedded
  // broadcasts, one load each.
  alignas(64) T xg[2][QC][KBr];
  for (int q = 0; q < QC; ++q)
    for (int kk = 0; kk < KBr; ++kk) {
      acc[q][kk] = kDx ? vload<T>(sc.accdx + ((int64_t)(q0 + q) * D + k0 + kk) * W) : V{};
      xg[0][q][kk] = sc.xt[(int64_t)(q0 + q) * D + k0 + kk];
      xg[1][q][kk] = sc.gt[(int64_t)(q0 + q) * D + k0 + kk];
    }
  const T* ybase = ytile + k0 * ld;
  T* dybase = dytile ? dytile + k0 * ld : nullptr;
  for (int c = 0; c < nvec; ++c) {
    const T(*opaque)[QC][KBr] = xg;
    __asm__("" : "+r"(opaque));
    const T(&xs)[QC][KBr] = opaque[0];
    const T(&gs)[QC][KBr] = opaque[1];
    V cc[QC], pp[QC];
    for (int q = 0; q < QC; ++q) {
      cc[q] = vload<T>(sc.C + (int64_t)(q0 + q) * CT + c * W);
      pp[q] = vload<T>(sc.P + (int64_t)(q0 + q) * CT + c * W);
    }
    for (int kk = 0; kk < KBr; ++kk) {
      const V y = vload<T>(ybase + kk * ld + c * W);
      V dy = kDy ? vload<T>(dybase + kk * ld + c * W) : V{};
      for (int q = 0; q < QC; ++q) {
        const V t = cc[q] * (y - xs[q][kk]);
        if (kDx) acc[q][kk] += t;
        if (kDy) dy -= kGrad ? t + pp[q] * gs[q][kk] : t;
      }
      if (kDy) vstore<T>(dybase + kk * ld + c * W, dy);
    }
  }
  if (kDx)
    for (int q = 0; q < QC; ++q)
      for (int kk = 0; kk < KBr; ++kk)
        vstore<T>(sc.accdx + ((int64_t)(q0 + q) * D + k0 + kk) * W, acc[q][kk]);
}

template <typename T, int QC, int KBr, bool kDx, bool kDy, bool kGrad>
static inline void backward_accumulate_tail(BackwardScratch<T>& sc, const Packed<T>& pk,
                                            const T* ytile, T* dytile, int64_t ld, int q0,
                                            int64_t k0, int nvec, int rem) {
  if constexpr (KBr > 0) {
    if (rem == KBr)
      backward_accumulate_block<T, QC, KBr, kDx, kDy, kGrad>(sc, pk, ytile, dytile, ld, q0, k0,
                                                             nvec);
    else
      backward_accumulate_tail<T, QC, KBr - 1, kDx, kDy, kGrad>(sc, pk, ytile, dytile, ld, q0,
                                                                k0, nvec, rem);
  }
}

// Phase C' for dx and dy with the block's x and g held in registers (AVX-512: 32 vector
// registers hold the QC x KBr accumulators, the 2 QC KBr broadcasts, the block's c and pi and
// the temporaries), so that a step loads only c, pi, y and dy: 10 loads per 6 pair-dimensions
// at 2 x 3, against 38 per 12 with the operands as broadcast loads (the loads bounded the
// loop: docs/performance.md). The per-pair-dimension work is d = y - x, the product c d added
// to dx and subtracted from dy, and dy -= pi g. Written as two FMAs (dx += c d, dy -= c d)
// it costs 3 FMA-pipe and 1 add-pipe instructions; as a product and two additions, 2 and 3.
// One pair-dimension in three takes the first form, two the second: 2.33 instructions on each
// pipe pair, 1.17 cycles with two FMA and two add pipes, where one form alone takes 1.5.
// The forms are fixed by position in the block, so the bits never depend on the thread.
template <typename T, int QC, int KBr, bool kGrad>
static inline void backward_accumulate_held(BackwardScratch<T>& sc, const Packed<T>& pk,
                                            const T* ytile, T* dytile, int64_t ld, int q0,
                                            int64_t k0, int nvec) {
  typedef VecT<T> V;
  constexpr int W = VecTraits<T>::W;
  const int64_t D = pk.D;
  const int CT = sc.CT;
  V acc[QC][KBr], xs[QC][KBr], gs[QC][KBr];
  for (int q = 0; q < QC; ++q)
    for (int kk = 0; kk < KBr; ++kk) {
      const int64_t e = (int64_t)(q0 + q) * D + k0 + kk;
      acc[q][kk] = vload<T>(sc.accdx + e * W);
      xs[q][kk] = vbroadcast<T>(sc.xt[e]);
      gs[q][kk] = kGrad ? vbroadcast<T>(sc.gt[e]) : V{};
    }
  const T* crow[QC];
  const T* prow[QC];
  for (int q = 0; q < QC; ++q) {
    crow[q] = sc.C + (int64_t)(q0 + q) * CT;
    prow[q] = sc.P + (int64_t)(q0 + q) * CT;
  }
  const T* ybase = ytile + k0 * ld;
  T* dybase = dytile + k0 * ld;
  int c = 0;
  do {  // nvec >= 1: accumulate_block's reasons (field_tile.h)
    V cc[QC], pp[QC];
    for (int q = 0; q < QC; ++q) {
      cc[q] = vload<T>(crow[q] + c * W);
      if (kGrad) pp[q] = vload<T>(prow[q] + c * W);
    }
    for (int kk = 0; kk < KBr; ++kk) {
      const V y = vhold<T>(vload<T>(ybase + kk * ld + c * W));
      V dy = vload<T>(dybase + kk * ld + c * W);
      for (int q = 0; q < QC; ++q) {
        const V d = y - xs[q][kk];
        if ((q * KBr + kk) % 3 == 0) {
          acc[q][kk] += cc[q] * d;
          dy -= cc[q] * d;
        } else {
          const V t = vhold<T>(cc[q] * d);
          acc[q][kk] += t;
          dy -= t;
        }
        if (kGrad) dy -= pp[q] * gs[q][kk];
      }
      vstore<T>(dybase + kk * ld + c * W, dy);
    }
  } while (++c < nvec);
  for (int q = 0; q < QC; ++q)
    for (int kk = 0; kk < KBr; ++kk)
      vstore<T>(sc.accdx + ((int64_t)(q0 + q) * D + k0 + kk) * W, acc[q][kk]);
}

template <typename T, int QC, int KBr, bool kGrad>
static inline void backward_accumulate_held_tail(BackwardScratch<T>& sc, const Packed<T>& pk,
                                                 const T* ytile, T* dytile, int64_t ld, int q0,
                                                 int64_t k0, int nvec, int rem) {
  if constexpr (KBr > 0) {
    if (rem == KBr)
      backward_accumulate_held<T, QC, KBr, kGrad>(sc, pk, ytile, dytile, ld, q0, k0, nvec);
    else
      backward_accumulate_held_tail<T, QC, KBr - 1, kGrad>(sc, pk, ytile, dytile, ld, q0, k0,
                                                           nvec, rem);
  }
}

// Register blocks of phase C': dy is read and written once per QC queries, so QC is larger
// than the forward's when dy is computed (4 x 3 instead of 2 x 6 on AVX-512). With both dx
// and dy on AVX-512, backward_accumulate_held's 2 x 3 blocks instead.
template <typename T, bool kDy>
struct BackwardBlock {
  static constexpr int QC = kDy ? 4 : Geometry<T>::QC;
  static constexpr int KB = kDy ? (Geometry<T>::KB + 1) / 2 : Geometry<T>::KB;
};

template <typename T>
struct HeldBlock {
  static constexpr bool kEnabled = kVecBytes == 64;
  static constexpr int QC = 2, KB = 3, QG = 8;
};

template <typename T, bool kDx, bool kDy, bool kGrad>
static void backward_accumulate(BackwardScratch<T>& sc, const Packed<T>& pk, T* dyT, int64_t j0,
                                int nvec) {
  const int64_t D = pk.D, ld = pk.width(j0);
  const T* ytile = pk.tile(j0);
  T* dytile = dyT ? dyT + j0 * D : nullptr;  // dy uses the charges' tiled layout
  if constexpr (kDx && kDy && HeldBlock<T>::kEnabled) {
    constexpr int QC = HeldBlock<T>::QC, KB = HeldBlock<T>::KB, QG = HeldBlock<T>::QG;
    // Groups of QG queries; in a group, dimension blocks outside and query pairs inside, so
    // the block's KB rows of y and dy stay in L1 while the group's pairs read and update them,
    // and the group's c and pi rows (QG x CT x 2) stay in L1 across the dimension blocks.
    // Every dy element still takes its queries in increasing order.
    for (int g0 = 0; g0 < sc.QT; g0 += QG) {
      const int g1 = g0 + QG < sc.QT ? g0 + QG : sc.QT;
      int64_t k0 = 0;
      for (; k0 + KB <= D; k0 += KB)
        for (int q0 = g0; q0 < g1; q0 += QC)
          backward_accumulate_held<T, QC, KB, kGrad>(sc, pk, ytile, dytile, ld, q0, k0, nvec);
      if (k0 < D)
        for (int q0 = g0; q0 < g1; q0 += QC)
          backward_accumulate_held_tail<T, QC, KB - 1, kGrad>(sc, pk, ytile, dytile, ld, q0,
                                                              k0, nvec, (int)(D - k0));
    }
    return;
  }
  constexpr int QC = BackwardBlock<T, kDy>::QC, KB = BackwardBlock<T, kDy>::KB;
  for (int q0 = 0; q0 < sc.QT; q0 += QC) {
    int64_t k0 = 0;
    for (; k0 + KB <= D; k0 += KB)
      backward_accumulate_block<T, QC, KB, kDx, kDy, kGrad>(sc, pk, ytile, dytile, ld, q0, k0,
                                                            nvec);
    if (k0 < D)
      backward_accumulate_tail<T, QC, KB - 1, kDx, kDy, kGrad>(sc, pk, ytile, dytile, ld, q0, k0,
                                                               nvec, (int)(D - k0));
  }
}

// v with lane `lane` set to 0.
template <typename T>
static inline VecT<T> zero_lane(VecT<T> v, int lane) {
  T lanes[VecTraits<T>::W];
  vstore<T>(lanes, v);
  lanes[lane] = (T)0;
  return vload<T>(lanes);
}

// One item: query tile [i0, i0 + nq) (already loaded in sc) against charge tile j0.
// Adds to accdx (lanes), dyT[:, tile] and gw[tile] (this row group's partials, which no other
// thread touches meanwhile: see the header comment).
// The power form of the per-pair term (power_form.h; never with dL/dw, see backward_impl):
// with rr = 1 / max(r2c, tiny) and t = g_j rr / Q_i, pi = t^(p/2) (0 below the cut) and
// a = p pi h rr: one division per pair instead of a log2, an exp2 and a division.
template <typename T>
static inline PairGrad<VecT<T>> power_pair_gradient(VecT<T> r2c, VecT<T> gdot, VecT<T> g,
                                                    T inv_q, T dl, T p,
                                                    const PowerPlan<T>& plan) {
  typedef VecT<T> V;
  const V tiny = vbroadcast<T>(Limits<T>::kTiny);
  const V rr = vbroadcast<T>((T)1) / vmax<T>(r2c, tiny);
  PairGrad<V> out;
  out.h = gdot - dl;
  out.pi = power_weight<T>(g * rr, inv_q, plan);
  out.a = r2c < tiny ? V{} : (p * (out.pi * out.h)) * rr;
  out.u = V{};
  return out;
}

template <typename T>
static void backward_item(BackwardScratch<T>& sc, const Packed<T>& pk, const PowerPlan<T>& plan,
                          int64_t j0, T half_p, bool has_g, bool need_x, bool need_y,
                          bool need_w, T* dyT, T* gwT, int nq, bool prefetch_next) {
  typedef VecT<T> V;
  typedef Geometry<T> G;
  constexpr int W = G::W;
  const int QT = sc.QT;
  const int CT = sc.CT;
  const int ncharges = (int)pk.width(j0);
  const int nvec = ncharges / W;
  const T* ytile = pk.tile(j0);

  const char* ahead = nullptr;
  int64_t ahead_lines = 0;
  if (prefetch_next && need_y && j0 + CT < pk.Bp) {  // the next tile's dy partials
    ahead = (const char*)(dyT + (j0 + CT) * pk.D);
    ahead_lines = (int64_t)sizeof(T) * pk.D * pk.width(j0 + CT) / 64;
  }
  if (sc.embed)
    backward_pairs_tile<T, true>(sc, pk, ytile, ncharges, nvec, has_g, ahead, ahead_lines);
  else
    backward_pairs_tile<T, false>(sc, pk, ytile, ncharges, nvec, has_g, ahead, ahead_lines);

  // Phase B': the shared per-pair gradient term on a vector of charges.
  const T p = half_p * (T)2;
  for (int q = 0; q < QT; ++q) {
    const T* rrow = sc.R + (int64_t)q * CT;
    const T* grow = sc.G + (int64_t)q * CT;
    T* prow = sc.P + (int64_t)q * CT;
    T* crow = sc.C + (int64_t)q * CT;
    // Padding rows (q >= nq repeat the last query) and dead rows have no weight at all:
    // lse2 = +inf makes every 2^(... - lse2) exactly 0.
    const bool live = q < nq && sc.lse2[q] < (T)INFINITY;
    const T lse2 = live ? sc.lse2[q] : (T)INFINITY;
    const T dl = sc.delta[q];
    // The excluded charge of this row, if it is in this tile: its lane is replaced by zeros
    // (a select: at an exact coincidence that lane holds inf).
    const int64_t e = sc.excl[q];
    const int ecol = (e >= j0 && e < j0 + ncharges) ? (int)(e - j0) : -1;
    const T inv_q = live ? sc.inv_q[q] : (T)0;
    for (int c = 0; c < nvec; ++c) {
      PairGrad<V> g =
          plan.enabled
              ? power_pair_gradient<T>(vload<T>(rrow + c * W), vload<T>(grow + c * W),
                                       vload<T>(pk.g + j0 + c * W), inv_q, dl, p, plan)
              : pair_gradient<VecMath<T>>(vload<T>(rrow + c * W), vload<T>(grow + c * W),
                                          vload<T>(pk.lw + j0 + c * W), lse2, dl, p, half_p,
                                          Limits<T>::kTiny);
      const bool has_excluded = ecol >= 0 && ecol / W == c;
      if (has_excluded) {
        g.pi = zero_lane<T>(g.pi, ecol % W);
        g.a = zero_lane<T>(g.a, ecol % W);
      }
      vstore<T>(prow + c * W, g.pi);
      vstore<T>(crow + c * W, g.a);
      if (need_w && live) {
        // dL/dw_j gets (pi / w_j) h; padding lanes (j >= B) are never read back.
        V pw = pair_weight_gradient<VecMath<T>>(g);
        if (has_excluded) pw = zero_lane<T>(pw, ecol % W);
        vstore<T>(gwT + j0 + c * W, vload<T>(gwT + j0 + c * W) + pw);
      }
    }
  }

  if (need_x && need_y) {
    if (has_g) backward_accumulate<T, true, true, true>(sc, pk, dyT, j0, nvec);
    else backward_accumulate<T, true, true, false>(sc, pk, dyT, j0, nvec);
  } else if (need_x) {
    backward_accumulate<T, true, false, false>(sc, pk, dyT, j0, nvec);
  } else if (need_y) {
    if (has_g) backward_accumulate<T, false, true, true>(sc, pk, dyT, j0, nvec);
    else backward_accumulate<T, false, true, false>(sc, pk, dyT, j0, nvec);
  }
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
