// Argument blocks shared by the bindings, the run-time dispatcher and every per-ISA copy of the
// CPU kernels. Plain structs of pointers and sizes: the extension never sees a torch tensor.
// All arrays are dense, row-major and of the element type named by `is_double`.
#pragma once

#include <stdint.h>

namespace poissonflow {

// Forward field: v (N, D) and log_scale (N,) of queries x (N, D) against charges y (B, D).
struct FieldArgs {
  const void* x = nullptr;   // (N, D)
  const void* y = nullptr;   // (B, D)
  const void* w = nullptr;   // (B,) non-negative weights, or null for unit weights
  const int64_t* exclude = nullptr;  // (N,) index of a charge each query ignores, -1 for none
  const void* eps2_rows = nullptr;   // (N,) per-query softening squared, or null (then eps2)
  int64_t N = 0, B = 0, D = 0;
  double power = 0.0;  // p in r2^(-p/2)
  double eps2 = 0.0;   // softening squared, used when eps2_rows is null
  void* v = nullptr;          // out (N, D)
  void* log_scale = nullptr;  // out (N,)
  int num_threads = 1;
  bool is_double = false;
};

// Backward of the field (DESIGN.md section 2). Upstream gradients gv (N, D) and gl (N,) may be
// null (treated as zero). Outputs that are null are not computed.
struct FieldBackwardArgs {
  FieldArgs fwd;             // inputs of the forward pass (its outputs v and log_scale are read)
  const void* gv = nullptr;  // (N, D)
  const void* gl = nullptr;  // (N,)
  void* gx = nullptr;        // out (N, D)
  void* gy = nullptr;        // out (B, D)
  void* gw = nullptr;        // out (B,): dL/dw
};

// Fused flow steps (DESIGN.md section 3): states x (N, D) with heights z = exp(t), integrated in
// t = log z by `n_steps` steps of size dt (per query) from t0 (per query), charges on z = 0.
// The field uses field.power (d + 1 for the flow) and r2 = |x - y|^2 + z^2; field.eps2 and
// field.eps2_rows are ignored.
struct FlowArgs {
  FieldArgs field;           // x: the start states; exclude/w/power as for the field
  const double* t0 = nullptr;  // (N,) start log-height per query
  const double* dt = nullptr;  // (N,) step in t per query (any sign)
  int64_t n_steps = 1;
  int solver = 0;            // 0: Euler, 1: classic RK4
  void* x_out = nullptr;     // out (N, D): end states
};

}  // namespace poissonflow
