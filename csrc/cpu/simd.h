// Portable SIMD layer for the CPU kernels.
//
// The kernels are written once against `Vec<T, W>` (GCC/Clang vector extensions) and compiled
// several times, once per instruction set (see CMakeLists.txt: generic, AVX2+FMA, AVX-512),
// each copy inside its own namespace PF_ISA_NS so that the copies never meet at link time.
// No STL templates are used here or in the kernels: an inline STL function instantiated in an
// AVX-512 translation unit could be picked by the linker for the generic path as well.
//
// Besides + - * (contracted to FMA by -ffp-contract=fast) the kernels need broadcast, loads,
// stores, max, select, a horizontal sum in a fixed order, and exp2/log2 accurate to a few ulp.
// exp2/log2 are polynomial (no libm per lane): log2 uses the atanh series of ln on
// [sqrt(1/2), sqrt(2)), exp2 a Taylor polynomial on [-1/2, 1/2]; both degrees are chosen so the
// truncation error is below the type's half-ulp (float: 5e-9 and 4e-11; double: 4e-18, 6e-19).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef PF_ISA_NS
#error "PF_ISA_NS must name the instruction-set namespace of this translation unit"
#endif

namespace poissonflow {
namespace PF_ISA_NS {

// Vector width in bytes for this translation unit.
#if defined(PF_ISA_AVX512)
constexpr int kVecBytes = 64;
#elif defined(PF_ISA_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct VecTraits;

template <>
struct VecTraits<float> {
  static constexpr int W = kVecBytes / 4;
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef float U __attribute__((vector_size(kVecBytes), aligned(4)));  // V at any float
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  typedef int32_t SInt;
  static constexpr int kMantBits = 23;
  static constexpr int kExpBias = 127;
  static constexpr int kMinExp = -126;  // smallest normal exponent
};

template <>
struct VecTraits<double> {
  static constexpr int W = kVecBytes / 8;
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef double U __attribute__((vector_size(kVecBytes), aligned(8)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  typedef int64_t SInt;
  static constexpr int kMantBits = 52;
  static constexpr int kExpBias = 1023;
  static constexpr int kMinExp = -1022;
};

template <typename T>
using VecT = typename VecTraits<T>::V;
template <typename T>
using IVecT = typename VecTraits<T>::I;

template <typename T>
static inline VecT<T> vbroadcast(T s) {
  return VecT<T>{} + s;
}

// y - *x in every lane. With kEmbed (avx512), *x is a broadcast memory operand of the
// subtraction itself ({1toW}); otherwise the compiler loads the broadcast once into a register
// and shares it between the subtractions of one x (phase A: 2 of them). On Zen 4 those
// stand-alone 512-bit broadcast loads slow phase A's step from 12 cycles to 18, and a
// subtraction with its own broadcast operand runs at the pipes' rate; on CPUs that run 2 loads
// a cycle and 4 vector instructions (Zen 5) the embedded operands' extra loads would bind
// instead (docs/performance.md, "Zen 4"; the choice: dispatch.cpp, resolve_broadcasts). The same
// IEEE subtraction either way: results are bit-identical.
template <typename T, bool kEmbed>
static inline VecT<T> vsub_broadcast(VecT<T> y, const T* x) {
#if defined(PF_ISA_AVX512) && defined(__x86_64__)
  if constexpr (kEmbed) {
    VecT<T> d;
    if constexpr (sizeof(T) == 4)
      __asm__("vsubps %2%{1to16%}, %1, %0" : "=v"(d) : "v"(y), "m"(*x));
    else
      __asm__("vsubpd %2%{1to8%}, %1, %0" : "=v"(d) : "v"(y), "m"(*x));
    return d;
  }
#endif
  return y - *x;
}

// acc - d * *g as one fused operation; with kEmbed (avx512) *g is a broadcast memory operand
// (vsub_broadcast's reason). The compiled shared form is the same vfnmadd with a broadcast
// register: the same single rounding.
template <typename T, bool kEmbed>
static inline VecT<T> vfnmadd_broadcast(VecT<T> d, const T* g, VecT<T> acc) {
#if defined(PF_ISA_AVX512) && defined(__x86_64__)
  if constexpr (kEmbed) {
    if constexpr (sizeof(T) == 4)
      __asm__("vfnmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(d), "m"(*g));
    else
      __asm__("vfnmadd231pd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(d), "m"(*g));
    return acc;
  }
#endif
  return acc - *g * d;
}

// v, held in a register as it is: the empty asm hides where v came from, at no instruction's
// cost, so the compiler neither fuses a product into the additions that use it (with
// -ffp-contract=fast, t = c d; a += t; b -= t would become two FMAs) nor re-reads a loaded
// value from memory at each of its uses.
template <typename T>
static inline VecT<T> vhold(VecT<T> v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

// Unaligned vector loads and stores through a vector of T (VecTraits::U), not memcpy: a
// memcpy may alias any object, so GCC re-read struct fields and row pointers after every
// store (scores_block's per-pair code, 72 scalar instructions per 12 vectors); a vector of T
// aliases only T. The same instructions either way.
template <typename T>
static inline VecT<T> vload(const T* p) {
  return *(const typename VecTraits<T>::U*)p;
}

template <typename T>
static inline void vstore(T* p, VecT<T> v) {
  *(typename VecTraits<T>::U*)p = v;
}

template <typename T>
static inline VecT<T> vmax(VecT<T> a, VecT<T> b) {
  return a > b ? a : b;
}

template <typename T>
static inline VecT<T> vmin(VecT<T> a, VecT<T> b) {
  return a < b ? a : b;
}

// Correctly rounded square root per lane (IEEE sqrt: the same bits in every ISA copy). With
// -fno-math-errno (CMakeLists.txt) the loop compiles to one vsqrtps/vsqrtpd of the vector. In
// the AVX-512 copy the instruction is written out: GCC sized the 16-lane loop as such when it
// chose what to inline and kept it out of line, a call per root around which the weights'
// loops kept their running products in memory (no zmm register survives a call); inlined by
// force, the loop's size estimate moved other inlining choices in field_tile (the forward 2%
// slower at D = 3). Written out, it is one statement to the inliner.
template <typename T>
static inline VecT<T> vsqrt(VecT<T> x) {
#if defined(PF_ISA_AVX512) && defined(__x86_64__)
  VecT<T> r;
  if constexpr (sizeof(T) == 4)
    __asm__("vsqrtps %1, %0" : "=v"(r) : "v"(x));
  else
    __asm__("vsqrtpd %1, %0" : "=v"(r) : "v"(x));
  return r;
#else
  constexpr int W = VecTraits<T>::W;
  T lanes[W];
  memcpy(lanes, &x, sizeof(x));
  for (int i = 0; i < W; ++i) {
    if constexpr (sizeof(T) == 4) lanes[i] = __builtin_sqrtf(lanes[i]);
    else lanes[i] = __builtin_sqrt(lanes[i]);
  }
  memcpy(&x, lanes, sizeof(x));
  return x;
#endif
}

// A square root on the FMA pipes instead of the divider (AVX-512, float; every other copy and
// float64 use vsqrt). On Zen 4 the divider takes 10 cycles for a vector of 16 square roots,
// and where the power form's weights phase (field_tile.h) has little else to run beside them
// it binds. This takes the ISA's 14-bit estimate (vrsqrt14ps: relative error below 2^-14) and
// one Newton step, 5 instructions on the FMA pipes, within about 1 ulp where IEEE is within
// 0.5. The kernels give it a fixed share of the vectors, chosen by position (never by thread),
// so that both units work: results are the same run to run and at any thread count. The
// estimate's bits are not fixed by the ISA, only its error bound: another AVX-512 CPU may round
// a last bit differently. kNewtonForms says whether this copy has it.
template <typename T>
constexpr bool kNewtonForms = sizeof(T) == 4 && kVecBytes == 64;

// sqrt(x) for x a positive normal number (0 would give NaN): s = x r with r ~ 1 / sqrt(x),
// then s + s (1/2 - s r / 2), the Newton step for 1 / sqrt(x) carried on s.
template <typename T>
static inline VecT<T> vsqrt_newton(VecT<T> x) {
#if defined(PF_ISA_AVX512) && defined(__x86_64__)
  if constexpr (kNewtonForms<T>) {
    VecT<T> r;
    __asm__("vrsqrt14ps %1, %0" : "=v"(r) : "v"(x));
    const VecT<T> s = x * r;
    const VecT<T> h = r * (T)0.5;
    return s + s * ((T)0.5 - s * h);
  }
#endif
  return vsqrt<T>(x);
}

// Horizontal sum, always in the same order (pairwise over lanes), so results never depend on
// the thread that computed them.
template <typename T>
static inline T vhsum(VecT<T> v) {
  constexpr int W = VecTraits<T>::W;
  T lanes[W];
  memcpy(lanes, &v, sizeof(v));
  for (int step = 1; step < W; step *= 2)
    for (int i = 0; i + step < W; i += 2 * step) lanes[i] += lanes[i + step];
  return lanes[0];
}

// A permutation mask for __builtin_shuffle of two vectors: lane i takes source lane index(i)
// (0..W-1 from the first vector, W..2W-1 from the second); constant-folded by the compiler.
template <typename T, class F>
static inline IVecT<T> lane_mask(F index) {
  typedef typename VecTraits<T>::SInt S;
  S lanes[VecTraits<T>::W];
  for (int i = 0; i < VecTraits<T>::W; ++i) lanes[i] = (S)index(i);
  IVecT<T> m;
  memcpy(&m, lanes, sizeof(m));
  return m;
}

// The horizontal sums of W consecutive vectors a[0..W), a[k] at a + k W, into out[0..W): bit for
// bit vhsum of each (the same pairwise tree: lanes (0, 1), (2, 3), ... first), but computed on
// whole vectors: every level pairs two vectors, takes their even and their odd lanes with two
// permutes and adds them, so W sums cost about 3 W instructions instead of about 20 each (the
// finalisation of a tile's lane accumulators: docs/DESIGN.md, "CPU threads and small calls").
template <typename T>
static inline void vhsum_block(const T* a, T* out) {
  constexpr int W = VecTraits<T>::W;
  typedef VecT<T> V;
  const IVecT<T> even = lane_mask<T>([](int i) { return 2 * i; });
  const IVecT<T> odd = lane_mask<T>([](int i) { return 2 * i + 1; });
  V level[W];
  for (int k = 0; k < W; ++k) level[k] = vload<T>(a + (int64_t)k * W);
  for (int n = W; n > 1; n /= 2)
    for (int k = 0; k < n / 2; ++k) {
      const V lo = level[2 * k], hi = level[2 * k + 1];
      level[k] = __builtin_shuffle(lo, hi, even) + __builtin_shuffle(lo, hi, odd);
    }
  vstore<T>(out, level[0]);
}

// Transposes a W x W block: row i of src (W values at src + i lds) becomes column i of dst
// (dst + k ldd holds element k of every row). log2 W stages of W two-source permutes that
// interleave the low and the high halves of rows j and j + W/2 (a perfect shuffle: after
// log2 W of them, vector k holds element k of every row), about log2 W / W instructions per
// element where a scalar copy needs two.
template <typename T>
static inline void vtranspose_block(const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int W = VecTraits<T>::W;
  typedef VecT<T> V;
  // zip of the low halves (lanes 0..W/2-1 of both) and of the high halves
  const IVecT<T> lo = lane_mask<T>([](int i) { return i / 2 + (i % 2) * W; });
  const IVecT<T> hi = lane_mask<T>([](int i) { return W / 2 + i / 2 + (i % 2) * W; });
  V r[W], t[W];
  for (int i = 0; i < W; ++i) r[i] = vload<T>(src + i * lds);
  for (int s = 1; s < W; s *= 2) {
    for (int j = 0; j < W / 2; ++j) {
      t[2 * j] = __builtin_shuffle(r[j], r[j + W / 2], lo);
      t[2 * j + 1] = __builtin_shuffle(r[j], r[j + W / 2], hi);
    }
    for (int i = 0; i < W; ++i) r[i] = t[i];
  }
  for (int k = 0; k < W; ++k) vstore<T>(dst + k * ldd, r[k]);
}

// The largest lane (inputs are finite or -inf: the kernels' inputs are checked finite, so no
// lane is NaN and the maximum does not depend on the order). A tree of log2 W rotations and
// maxima: the lane-by-lane chain was W - 1 dependent scalar maxima, about 45 cycles of latency
// on the path from a row's scores to its weights (phase B), paid once per row and tile.
template <typename T>
static inline T vhmax(VecT<T> v) {
  constexpr int W = VecTraits<T>::W;
  for (int half = W / 2; half >= 1; half /= 2)
    v = vmax<T>(v, __builtin_shuffle(v, lane_mask<T>([half](int i) { return (i + half) % W; })));
  return v[0];
}

// Round to nearest integer (ties to even) for |x| < 2^(mantissa bits - 1), by the magic-number
// trick; the build never uses -ffast-math, so the compiler keeps (x + c) - c.
template <typename T>
static inline VecT<T> vround(VecT<T> x) {
  const T magic = (T)1.5 * (T)(1LL << VecTraits<T>::kMantBits);
  VecT<T> t = x + magic;
  return t - magic;
}

// 2^x. Arguments below the smallest normal exponent give 0 (a weight that small relative to the
// running maximum cannot change a float sum); arguments above the exponent bias give inf (a
// slight underestimate of the overflow threshold, irrelevant to the kernels).
template <typename T>
static inline VecT<T> vexp2(VecT<T> x) {
  typedef VecTraits<T> Tr;
  typedef VecT<T> V;
  typedef IVecT<T> I;
  const V lo = vbroadcast<T>((T)(Tr::kMinExp));
  const V hi = vbroadcast<T>((T)(Tr::kExpBias));  // largest exponent with a finite 2^n
  V xc = vmin<T>(vmax<T>(x, lo), hi);
  V n = vround<T>(xc);
  V f = xc - n;  // in [-1/2, 1/2]
  V p;
  if (sizeof(T) == 4) {
    // Taylor coefficients (ln 2)^k / k!, degree 7: truncation 5e-9 relative.
    p = vbroadcast<T>((T)1.525273380405984028e-5);
    p = p * f + (T)1.540353039338160995e-4;
    p = p * f + (T)1.333355814642844342e-3;
    p = p * f + (T)9.618129107628477162e-3;
    p = p * f + (T)5.550410866482157995e-2;
    p = p * f + (T)2.402265069591007123e-1;
    p = p * f + (T)6.931471805599453094e-1;
    p = p * f + (T)1.0;
  } else {
    // degree 13: truncation 4e-18 relative.
    p = vbroadcast<T>((T)1.369148885390412888e-12);
    p = p * f + (T)2.567843599348820514e-11;
    p = p * f + (T)4.445538271870811498e-10;
    p = p * f + (T)7.054911620801123330e-9;
    p = p * f + (T)1.017808600923969973e-7;
    p = p * f + (T)1.321548679014430949e-6;
    p = p * f + (T)1.525273380405984028e-5;
    p = p * f + (T)1.540353039338160995e-4;
    p = p * f + (T)1.333355814642844342e-3;
    p = p * f + (T)9.618129107628477162e-3;
    p = p * f + (T)5.550410866482157995e-2;
    p = p * f + (T)2.402265069591007123e-1;
    p = p * f + (T)6.931471805599453094e-1;
    p = p * f + (T)1.0;
  }
  I ni = __builtin_convertvector(n, I);
  I bits = (ni + (typename Tr::SInt)Tr::kExpBias) << Tr::kMantBits;
  V scale;
  memcpy(&scale, &bits, sizeof(scale));
  V r = p * scale;
  // below the normal range: 0; above it: inf (the clamps above kept the bit trick valid)
  r = x < lo ? V{} : r;
  return x > hi ? vbroadcast<T>((T)INFINITY) : r;
}

// log2(x) for positive normal x (the kernels clamp r2 to the smallest normal number first).
template <typename T>
static inline VecT<T> vlog2(VecT<T> x) {
  typedef VecTraits<T> Tr;
  typedef VecT<T> V;
  typedef IVecT<T> I;
  typedef typename Tr::SInt S;
  I bits;
  memcpy(&bits, &x, sizeof(bits));
  I e = ((bits >> Tr::kMantBits) & (I{} + (S)((1 << (sizeof(T) == 4 ? 8 : 11)) - 1))) -
        (S)Tr::kExpBias;
  const S mant_mask = (S)((((int64_t)1) << Tr::kMantBits) - 1);
  const S one_bits = (S)Tr::kExpBias << Tr::kMantBits;
  I mbits = (bits & mant_mask) | one_bits;
  V m;
  memcpy(&m, &mbits, sizeof(m));  // m in [1, 2)
  const V sqrt2 = vbroadcast<T>((T)1.4142135623730950488);
  auto big = m > sqrt2;
  m = big ? m * (T)0.5 : m;  // m in [sqrt(1/2), sqrt(2))
  e = e + (big & (I{} + (S)1));
  V s = (m - (T)1) / (m + (T)1);  // |s| <= 0.1716
  V s2 = s * s;
  V q;
  if (sizeof(T) == 4) {
    // ln m = 2 atanh(s) = 2 s (1 + s2/3 + s2^2/5 + ...), six terms: 2e-9 relative.
    q = vbroadcast<T>((T)(1.0 / 11));
    q = q * s2 + (T)(1.0 / 9);
    q = q * s2 + (T)(1.0 / 7);
    q = q * s2 + (T)(1.0 / 5);
    q = q * s2 + (T)(1.0 / 3);
    q = q * s2 + (T)1;
  } else {
    q = vbroadcast<T>((T)(1.0 / 23));
    q = q * s2 + (T)(1.0 / 21);
    q = q * s2 + (T)(1.0 / 19);
    q = q * s2 + (T)(1.0 / 17);
    q = q * s2 + (T)(1.0 / 15);
    q = q * s2 + (T)(1.0 / 13);
    q = q * s2 + (T)(1.0 / 11);
    q = q * s2 + (T)(1.0 / 9);
    q = q * s2 + (T)(1.0 / 7);
    q = q * s2 + (T)(1.0 / 5);
    q = q * s2 + (T)(1.0 / 3);
    q = q * s2 + (T)1;
  }
  // log2 m = ln m / ln 2 = s * q * (2 / ln 2)
  V lm = s * q * (T)2.8853900817779268147;
  return __builtin_convertvector(e, V) + lm;
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
