// The argument blocks of both compiled backends, each declared once as a field list:
//   FieldArgs   the CPU kernels (poissonflow._C: field_forward, field_backward, flow_steps);
//   LaunchArgs  one CUDA kernel launch (poissonflow._cuda.launch, and the host emulator).
// From each list come the struct itself, the keyword-argument binding of its Python module
// (bind_args.h: every field is a keyword of the same name) and, for LaunchArgs, the field table
// that the emulator's ctypes mirror is built from (csrc/cuda/emulate), so no copy is kept by hand.
// Plain structs of addresses, sizes and scalars: neither extension ever sees a torch tensor.
// Arrays are dense and row-major, of the element type named by `is_double` (CPU) or of the
// compute type (CUDA: float32, or float64 when is_double).
#pragma once

#include <stddef.h>
#include <stdint.h>

// X(type, name, default)
#define POISSONFLOW_FIELD_ARGS(X)                                                             \
  /* inputs of every call */                                                                 \
  X(const void*, x, nullptr)           /* (N, D) queries; the flow's start states */          \
  X(const void*, y, nullptr)           /* (B, D) charges */                                   \
  X(const void*, w, nullptr)           /* (B,) non-negative weights, or null: unit weights */ \
  X(const int64_t*, exclude, nullptr)  /* (N,) a charge each query ignores, -1 for none */    \
  X(const void*, eps2_rows, nullptr)   /* (N,) per-query softening squared, or null: eps2 */  \
  X(int64_t, N, 0)                                                                            \
  X(int64_t, B, 0)                                                                            \
  X(int64_t, D, 0)                                                                            \
  X(double, power, 0.0)                /* p in r2^(-p/2); the flow passes d + 1 */            \
  X(double, eps2, 0.0)                 /* softening squared when eps2_rows is null */         \
  X(bool, is_double, false)                                                                   \
  X(int, num_threads, 1)                                                                      \
  X(int, weight_form, 0)               /* CPU softmax weights: 0 auto, 1 log domain, 2 power */ \
  X(int, broadcasts, 0)                /* CPU phase A's broadcasts: 0 auto, 1 shared, 2 embedded */ \
  /* forward outputs; the backward reads them */                                             \
  X(void*, v, nullptr)                 /* (N, D) */                                           \
  X(void*, log_scale, nullptr)         /* (N,) */                                             \
  /* backward: upstream gradients (null: zero) and outputs (null: not computed) */           \
  X(const void*, gv, nullptr)          /* (N, D) */                                           \
  X(const void*, gl, nullptr)          /* (N,) */                                             \
  X(void*, gx, nullptr)                /* (N, D) */                                           \
  X(void*, gy, nullptr)                /* (B, D) */                                           \
  X(void*, gw, nullptr)                /* (B,) dL/dw */                                       \
  /* fused flow steps (docs/DESIGN.md, "The flow"): heights z = exp(t), r2 = |x - y|^2 + z^2 */ \
  X(const double*, t0, nullptr)        /* (N,) start log-height per query */                  \
  X(const double*, dt, nullptr)        /* (N,) step in t per query (any sign) */              \
  X(int64_t, n_steps, 0)                                                                      \
  X(int, solver, 0)                    /* 0: Euler, 1: classic RK4 */                         \
  X(void*, x_out, nullptr)             /* (N, D) end states */

// Every address is a uint64 (0: absent); rows of x, y, gv, v, gx, gy, comb have the row stride
// `ld` (a multiple of 16 bytes, zero past D). The Python layer allocates every buffer.
#define POISSONFLOW_LAUNCH_ARGS(X)                                                             \
  X(uint64_t, x, 0)          /* query rows (N, ld); the flow's in/out state */                \
  X(uint64_t, y, 0)          /* charge rows (B, ld) */                                        \
  X(uint64_t, w, 0)                                                                           \
  X(uint64_t, exclude, 0)                                                                     \
  X(uint64_t, eps_rows, 0)   /* (N,) per-query softening (not squared) */                     \
  X(uint64_t, v, 0)          /* forward outputs: v rows and the log2-sum-exp per row */       \
  X(uint64_t, lse2, 0)                                                                        \
  X(uint64_t, gv, 0)         /* backward inputs */                                            \
  X(uint64_t, lse2_in, 0)                                                                     \
  X(uint64_t, delta, 0)      /* (N,) g_v . v per query */                                     \
  X(uint64_t, gl, 0)                                                                          \
  X(uint64_t, gx, 0)         /* backward outputs; gwsum = sum_i gs_ij / w_j */                \
  X(uint64_t, gy, 0)                                                                          \
  X(uint64_t, gwsum, 0)                                                                       \
  X(uint64_t, t0, 0)         /* flow: (N,) float64 start log-heights and steps */            \
  X(uint64_t, dt, 0)                                                                          \
  X(uint64_t, comb, 0)       /* RK4 scratch (N, ld) */                                        \
  X(int64_t, N, 0)                                                                            \
  X(int64_t, B, 0)                                                                            \
  X(int64_t, D, 0)                                                                            \
  X(int64_t, ld, 0)                                                                           \
  X(int64_t, n_steps, 0)                                                                      \
  X(int64_t, max_window, 0)  /* 0: as wide as registers allow (tests narrow it) */            \
  X(double, eps2, 0.0)                                                                        \
  X(double, power, 0.0)                                                                       \
  X(int32_t, input_dtype, 0) /* numerics::InputDtype: chooses the r2 floor */                 \
  X(int32_t, mode, 0)                                                                         \
  X(int32_t, is_double, 0)                                                                    \
  X(int32_t, solver, 0)                                                                       \
  X(int32_t, device, 0)                                                                       \
  X(uint64_t, stream, 0)

#define POISSONFLOW_DECLARE_FIELD(type, name, init) type name = init;
#define POISSONFLOW_VISIT_FIELD(type, name, init) f(#name, a.name);

namespace poissonflow {

struct FieldArgs {
  POISSONFLOW_FIELD_ARGS(POISSONFLOW_DECLARE_FIELD)
};

// Calls f(name, field) for every field, in declaration order.
template <class F>
inline void for_each_field(FieldArgs& a, F&& f) {
  POISSONFLOW_FIELD_ARGS(POISSONFLOW_VISIT_FIELD)
}

namespace cuda {

struct LaunchArgs {
  POISSONFLOW_LAUNCH_ARGS(POISSONFLOW_DECLARE_FIELD)
};

template <class F>
inline void for_each_field(LaunchArgs& a, F&& f) {
  POISSONFLOW_LAUNCH_ARGS(POISSONFLOW_VISIT_FIELD)
}

}  // namespace cuda
}  // namespace poissonflow
