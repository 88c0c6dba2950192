// Phase C's loop of the CPU forward (csrc/cpu/field_tile.h, accumulate_block) on its own: how
// close the compiled loop comes to the vector pipes' rate as a function of the number of charge
// vectors it runs over per (queries x dimensions) register block. A development aid for
// docs/performance.md, not part of the package:
//
//   g++ -O3 -mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -ffp-contract=fast \
//       -o /tmp/phase_c_loop bench/phase_c_loop.cpp && /tmp/phase_c_loop
//
// Per charge vector and block: QC loads of weights, KB loads of charge rows, QC x KB
// subtractions and QC x KB FMAs: at two FMA and two add pipes, QC x KB / 2 cycles ("ideal").
// Cycles are CPU seconds times the clock given as the first argument (GHz; default 4.2, the
// clock bench/ceiling.py measured on this project's Zen 5 machines). Best of 7 repeats.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <initializer_list>

typedef float V __attribute__((vector_size(64)));
static inline V vld(const float* p) { V v; memcpy(&v, p, 64); return v; }
static inline void vst(float* p, V v) { memcpy(p, &v, 64); }
static double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// The kernel's block: acc[q][k] += p[q][c] * (y[k][c] - x[q][k]) over nvec charge vectors.
template <int QC, int KB>
__attribute__((noinline)) void block(float* acc, const float* x, const float* S, int64_t ldS,
                                     const float* y, int64_t ld, int nvec, int64_t D) {
  V a[QC][KB];
  float xs[QC][KB];
  for (int q = 0; q < QC; ++q)
    for (int k = 0; k < KB; ++k) {
      a[q][k] = vld(acc + (q * D + k) * 16);
      xs[q][k] = x[q * D + k];
    }
  for (int c = 0; c < nvec; ++c) {
    V p[QC];
    for (int q = 0; q < QC; ++q) p[q] = vld(S + q * ldS + c * 16);
    for (int k = 0; k < KB; ++k) {
      const V yy = vld(y + k * ld + c * 16);
      for (int q = 0; q < QC; ++q) a[q][k] += p[q] * (yy - xs[q][k]);
    }
  }
  for (int q = 0; q < QC; ++q)
    for (int k = 0; k < KB; ++k) vst(acc + (q * D + k) * 16, a[q][k]);
}

// One tile as the kernel sweeps it: dimension blocks outside, query pairs inside.
static void run(double ghz, int nvec, int64_t QT, int64_t D) {
  constexpr int QC = 2, KB = 6;
  const int64_t ld = nvec * 16;
  float* y = (float*)aligned_alloc(64, 4 * ld * D);
  float* S = (float*)aligned_alloc(64, 4 * QT * ld);
  float* acc = (float*)aligned_alloc(64, 4 * QT * D * 16);
  float* x = (float*)aligned_alloc(64, 4 * QT * D);
  for (int64_t i = 0; i < ld * D; ++i) y[i] = 1e-3f * (i % 17);
  for (int64_t i = 0; i < QT * ld; ++i) S[i] = 1e-3f * (i % 13);
  for (int64_t i = 0; i < QT * D; ++i) x[i] = 1e-2f * (i % 7);
  memset(acc, 0, 4 * QT * D * 16);
  double best = 1e30;
  int64_t steps = 0;
  for (int rep = 0; rep < 7; ++rep) {
    steps = 0;
    const double t = cpu_seconds();
    for (int r = 0; r < 4096 / nvec; ++r)
      for (int64_t k0 = 0; k0 + KB <= D; k0 += KB)
        for (int64_t q0 = 0; q0 + QC <= QT; q0 += QC) {
          block<QC, KB>(acc + (q0 * D + k0) * 16, x + q0 * D + k0, S + q0 * ld, ld,
                        y + k0 * ld, ld, nvec, D);
          steps += nvec;
        }
    const double dt = cpu_seconds() - t;
    best = dt < best ? dt : best;
  }
  const double cycles = best * ghz * 1e9 / steps, ideal = QC * KB / 2.0;
  printf("%2d charge vectors, %2ld queries x D = %3ld: %5.2f cycles per vector (pipes: %.0f), "
         "%.2f of the pipes' rate\n", nvec, (long)QT, (long)D, cycles, ideal, ideal / cycles);
  float s = 0;
  for (int64_t i = 0; i < QT * D * 16; ++i) s += acc[i];
  if (s == 1.2345f) printf(" ");  // keep the sums live
  free(y); free(S); free(acc); free(x);
}

int main(int argc, char** argv) {
  const double ghz = argc > 1 ? atof(argv[1]) : 4.2;
  for (int nvec : {16, 32, 64}) {
    run(ghz, nvec, 30, 129);  // the D = 129 tile (from L1 and L2)
    run(ghz, nvec, 2, 12);    // everything in L1
  }
  return 0;
}
