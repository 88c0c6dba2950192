// Launch geometry of the CUDA field kernels, plain C++ (no CUDA headers) so that the pybind11
// binding, the launcher (.cu) and the host emulator (emulate/) all use one copy of it.
//
// One block (256 threads) owns BR = 64 rows ("own" rows: queries for the forward pass, the flow
// and dL/dx; charges for dL/dy and dL/dw) and streams tiles of BO rows of the other side through
// shared memory. Per tile:
//   phase A  pairwise r2 (and g . (x - y) for the backward) by direct differences, each thread a
//            4 x AO register block of pairs (own rows tr + 16 i, other rows to + 16 j);
//   phase B  per-row reductions through shared memory (no warp shuffles, see field_block.cuh);
//   phase C  acc(own row, dim) += coef(pair) * (other - own), each thread UPT "units" of
//            TM = 4 rows x TN = 16 bytes of dimensions, kept in registers across all tiles.
//
// Dimension D is a runtime value. The register accumulators cover a "window" of at most
// 16 * UPT * TN dimensions (256 floats / 128 doubles at UPT = 4); UPT is a template parameter
// chosen per call among a few instances (float 1..4, double 1, 2, 4), so small D does not pay for
// the registers of large D. A D wider than one window (or than the shared memory allows) is split
// into `splits` windows on blockIdx.y: each such block recomputes the full r2 (staging D in
// window-sized chunks, in the same k order, so every split sees bit-identical scores) and
// accumulates only its window. The fused flow needs the whole state in one block, so it has no
// splits; wider flows fall back to per-stage field passes in Python.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "common/field_args.h"
#include "common/field_numerics.h"

namespace poissonflow {
namespace cuda {

enum Mode : int32_t { kForward = 0, kFlow = 1, kBackwardX = 2, kBackwardY = 3 };

template <typename T>
struct Geo {
  static constexpr int kThreads = 256;
  static constexpr int kVec = 16 / (int)sizeof(T);    // elements per 16-byte load
  static constexpr int kLanes = 16;                   // phase-A threads sharing one own row
  static constexpr int AR = 4;                        // phase A: own rows per thread
  static constexpr int AO = sizeof(T) == 4 ? 4 : 2;   // phase A: other rows per thread
  static constexpr int BR = kThreads / kLanes * AR;   // 64 own rows per block
  static constexpr int BO = kLanes * AO;              // 64 (float) / 32 (double) other rows
  static constexpr int TM = 4;                        // phase C unit: rows
  static constexpr int TN = kVec;                     // phase C unit: dimensions
  static constexpr int kRowGroups = BR / TM;          // 16
  static constexpr int kMaxUpt = 4;
  static constexpr int kLdp = BR + kVec;              // coefficient tile row stride: odd packs
};

// Per-row scalars kept in shared memory (own rows: BR entries each, other rows: BO). kRowDelta /
// kOthDelta hold a query's g_v . v - g_l (the backward's per-row part of h_ij).
enum OwnRow : int { kRowM = 0, kRowL, kRowAlpha, kRowE2, kRowLse2, kRowDelta, kRowLw, kRowDw,
                    kRowDt, kOwnRowArrays };
enum OtherRow : int { kOthLw = 0, kOthE2, kOthLse2, kOthDelta, kOtherRowArrays };

// Everything a kernel needs to know about the geometry of one call; passed by value.
struct Plan {
  int32_t mode = 0;
  int32_t is_double = 0;
  int32_t upt = 0;        // register units per thread (selects the kernel instance)
  int32_t packs = 0;      // 16-byte packs per staged row (window / kVec)
  int64_t window = 0;     // dimensions per split (multiple of TN)
  int64_t splits = 0;     // windows on blockIdx.y
  int64_t dv = 0;         // D rounded up to TN
  int64_t off_own = 0, off_other = 0, off_g = 0, off_coef = 0, off_coef2 = 0, off_red = 0,
          off_rows_own = 0, off_rows_other = 0, off_excl_own = 0, off_excl_other = 0;
  int64_t smem_bytes = 0;
};

// Shared memory a kernel holds besides the plan's dynamic part: the sm_90 binaries carry 1,024
// bytes of static shared memory per kernel (cuobjdump -res-usage: SHARED:1024; sm_80: 0), which
// counts against the same per-block opt-in limit. make_plan keeps this much of the limit free;
// tests/test_gpu_build_budget.py checks every compiled instance's static part against it.
constexpr int64_t kStaticSmemReserve = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Register-unit counts compiled for each element type (kept few: each is a kernel instance).
inline int choose_upt(bool is_double, int64_t needed) {
  if (needed <= 1) return 1;
  if (needed <= 2) return 2;
  if (!is_double && needed <= 3) return 3;
  return 4;
}

template <typename T>
inline int64_t smem_layout(Plan& p) {
  typedef Geo<T> G;
  // Staged tiles are pack-major with R + 1 packs per dimension pack (field_block.cuh).
  const int64_t pack_bytes = 16 * (int64_t)p.packs;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off = round_up(off + bytes, 16);
    return at;
  };
  p.off_own = take(pack_bytes * (G::BR + 1));
  p.off_other = take(pack_bytes * (G::BO + 1));
  const int64_t g_rows = p.mode == kBackwardX ? G::BR + 1 : (p.mode == kBackwardY ? G::BO + 1 : 0);
  p.off_g = take(pack_bytes * g_rows);
  p.off_coef = take((int64_t)sizeof(T) * G::BO * G::kLdp);
  p.off_coef2 = take((int64_t)sizeof(T) * (p.mode == kBackwardY ? G::BO * G::kLdp : 0));
  p.off_red = take((int64_t)sizeof(T) * G::BR * (G::kLanes + 1));  // stride kRedStride
  p.off_rows_own = take((int64_t)sizeof(T) * kOwnRowArrays * G::BR);
  p.off_rows_other = take((int64_t)sizeof(T) * kOtherRowArrays * G::BO);
  p.off_excl_own = take((int64_t)sizeof(int64_t) * G::BR);
  p.off_excl_other = take((int64_t)sizeof(int64_t) * G::BO);
  return off;
}

template <typename T>
inline bool make_plan_t(int mode, int64_t D, int64_t smem_limit, int64_t max_window, Plan& p,
                        std::string& err) {
  typedef Geo<T> G;
  p = Plan();
  p.mode = mode;
  p.is_double = sizeof(T) == 8;
  p.dv = round_up(D, G::TN);
  // Widest window the registers hold: 256 threads x kMaxUpt units over 16 row groups.
  const int64_t cap = (int64_t)G::kThreads * G::kMaxUpt / G::kRowGroups * G::TN;
  int64_t wmax = cap;
  if (max_window > 0) {  // a narrower cap (tests use it to exercise the splits)
    const int64_t m = max_window / G::TN * G::TN;
    wmax = m < G::TN ? G::TN : (m < cap ? m : cap);
  }
  for (int64_t splits = ceil_div(p.dv, wmax);; ++splits) {
    const int64_t w = round_up(ceil_div(p.dv, splits), G::TN);
    if (mode == kFlow && splits > 1) {
      err = "the fused flow kernel keeps a query's whole state in one block; dimension " +
            std::to_string(D) + " is wider than its register window (" + std::to_string(wmax) +
            ") or its shared memory";
      return false;
    }
    p.window = w;
    p.splits = splits;
    p.packs = (int32_t)(w / G::kVec);
    const int64_t ncc = w / G::TN;
    p.upt = choose_upt(p.is_double, ceil_div(ncc * G::kRowGroups, G::kThreads));
    p.smem_bytes = smem_layout<T>(p);
    if (smem_limit <= 0 || p.smem_bytes <= smem_limit) return true;
    if (w <= G::TN) break;
  }
  err = "shared memory per block (" + std::to_string(smem_limit) +
        " bytes) is too small for the field kernel's tiles";
  return false;
}

// smem_limit: the device's per-block opt-in shared memory (0: unlimited); the plan's dynamic
// shared memory stays within smem_limit - kStaticSmemReserve.
inline bool make_plan(int mode, bool is_double, int64_t D, int64_t smem_limit, int64_t max_window,
                      Plan& p, std::string& err) {
  if (mode < kForward || mode > kBackwardY) {
    err = "unknown kernel mode " + std::to_string(mode);
    return false;
  }
  if (D < 1) {
    err = "dimension D must be >= 1";
    return false;
  }
  if (smem_limit > 0) smem_limit = smem_limit > kStaticSmemReserve ? smem_limit - kStaticSmemReserve : 1;
  return is_double ? make_plan_t<double>(mode, D, smem_limit, max_window, p, err)
                   : make_plan_t<float>(mode, D, smem_limit, max_window, p, err);
}

// The arguments of one launch (LaunchArgs) are declared in common/field_args.h.

// Checks that do not need the data: sizes, strides, required buffers. Empty string when fine.
inline std::string check_launch_args(const LaunchArgs& a) {
  const int64_t vec = a.is_double ? 2 : 4;
  if (a.N < 0 || a.B < 1 || a.D < 1) return "need N >= 0, B >= 1, D >= 1";
  if (a.ld < a.D || a.ld % vec != 0) return "row stride ld must be >= D and a multiple of 16 bytes";
  if (!a.x || !a.y) return "x and y are required";
  if (!numerics::valid_input_dtype(a.input_dtype))
    return "input_dtype must be a numerics::InputDtype code (0 float32, 1 float64, 2 float16, "
           "3 bfloat16)";
  if ((a.input_dtype == numerics::kInputFloat64) != (a.is_double != 0))
    return "input_dtype float64 is computed in double, every other input dtype in float";
  const uint64_t align_mask = 15;
  const uint64_t rows[] = {a.x, a.y, a.v, a.gv, a.gx, a.gy, a.comb};
  for (uint64_t r : rows)
    if (r & align_mask) return "row buffers must be 16-byte aligned";
  switch (a.mode) {
    case kForward:
      if (!a.v || !a.lse2) return "forward needs v and lse2 outputs";
      break;
    case kFlow:
      if (!a.t0 || !a.dt) return "flow needs t0 and dt";
      if (a.n_steps < 1) return "flow needs n_steps >= 1";
      if (a.solver != 0 && a.solver != 1) return "solver must be 0 (euler) or 1 (rk4)";
      if (a.solver == 1 && !a.comb) return "rk4 needs the comb scratch buffer";
      break;
    case kBackwardX:
      if (!a.gv || !a.lse2_in || !a.delta || !a.gx) return "backward_x needs gv, lse2_in, delta, gx";
      break;
    case kBackwardY:
      if (!a.gv || !a.lse2_in || !a.delta) return "backward_y needs gv, lse2_in, delta";
      if (!a.gy && !a.gwsum) return "backward_y needs gy or gwsum";
      break;
    default:
      return "unknown kernel mode";
  }
  return std::string();
}

}  // namespace cuda
}  // namespace poissonflow
