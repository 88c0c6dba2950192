// Host emulator of the CUDA field kernels, for tests on machines without a GPU.
//
// It runs the very block program of the kernels (csrc/cuda/field_block.cuh) with a host
// executor: every each() phase runs the 256 "threads" one after another, sync() is a no-op, and
// each thread's registers are an entry of an array. The grid is a loop over blocks; the launch
// plan, the kernel-instance choice and the argument checks are the launcher's own (block_plan.h,
// instances.h). Built by tests/cuda_emulation/ with the host compiler and loaded with ctypes; the
// ctypes mirror of LaunchArgs is built from the table that pf_emu_launch_arg() reads out of the
// struct's one declaration (common/field_args.h).
//
// What this validates: the tiling, the shared-memory layout and indexing, the per-thread
// arithmetic, ragged tiles, the dimension splits, exclusion, dead rows, the flow epilogues and
// that every value is staged before it is read (shared memory and registers start as NaN). By
// running the threads of each phase in different orders (ascending, descending, shuffled) and
// comparing, it also catches two threads of one phase touching the same shared datum.
// What it cannot validate: real concurrency (a sync() missing between two phases), warp-level
// behaviour, bank conflicts, register pressure and spills, launch limits and the CUDA math
// library's last-ulp differences from libm's exp2/log2.
#include <stdint.h>
#include <string.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../field_block.cuh"
#include "../instances.h"
#include "common/field_args.h"
#include "common/field_numerics.h"

namespace {

using namespace poissonflow::cuda;

constexpr int kThreads = 256;

struct HostExec {
  int order_kind = 0;  // 0: ascending thread ids, 1: descending, 2: shuffled per phase
  uint64_t rng = 0;
  std::vector<int> order;

  HostExec(int kind, uint64_t seed) : order_kind(kind), rng(seed * 2862933555777941757ULL + 1) {
    order.resize(kThreads);
    for (int t = 0; t < kThreads; ++t) order[t] = kind == 1 ? kThreads - 1 - t : t;
  }

  template <class S>
  struct Slots {
    std::vector<S> v;
    S& operator()(int t) { return v[(size_t)t]; }
  };
  template <class S>
  Slots<S> states() {
    Slots<S> s;
    s.v.resize(kThreads);
    memset((void*)s.v.data(), 0xff, sizeof(S) * s.v.size());  // NaN: registers start undefined
    return s;
  }
  template <class F>
  void each(F&& f) {
    if (order_kind == 2) {
      for (int t = kThreads - 1; t > 0; --t) {  // Fisher-Yates with a 64-bit LCG
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        const int k = (int)((rng >> 33) % (uint64_t)(t + 1));
        const int tmp = order[t];
        order[t] = order[k];
        order[k] = tmp;
      }
    }
    for (int t : order) f(t);
  }
  void sync() {}
};

void set_error(char* buf, int len, const std::string& msg) {
  if (buf && len > 0) {
    strncpy(buf, msg.c_str(), (size_t)len - 1);
    buf[len - 1] = 0;
  }
}

}  // namespace

extern "C" {

int64_t pf_emu_sizeof_launch_args() { return (int64_t)sizeof(LaunchArgs); }

// Field i of LaunchArgs in declaration order: name, byte offset, size and kind ('u' unsigned,
// 'i' signed integer, 'f' floating point). Returns 0, or 1 past the last field.
int pf_emu_launch_arg(int index, const char** name, int64_t* offset, int64_t* size, char* kind) {
  LaunchArgs a;
  int i = 0, found = 0;
  for_each_field(a, [&](const char* n, auto& field) {
    typedef typename std::remove_reference<decltype(field)>::type F;
    if (i++ != index) return;
    *name = n;
    *offset = (int64_t)((const char*)&field - (const char*)&a);
    *size = (int64_t)sizeof(F);
    *kind = std::is_floating_point<F>::value ? 'f' : (std::is_signed<F>::value ? 'i' : 'u');
    found = 1;
  });
  return found ? 0 : 1;
}

// Constant i of numerics() (common/field_numerics.h). Returns 0, or 1 past the last one.
int pf_emu_numeric(int index, const char** name, double* value, int* is_integer) {
  int i = 0, found = 0;
  poissonflow::numerics::for_each_constant([&](const char* n, double v, bool is_int) {
    if (i++ != index) return;
    *name = n;
    *value = v;
    *is_integer = is_int ? 1 : 0;
    found = 1;
  });
  return found ? 0 : 1;
}

// out: upt, window, splits, packs, smem_bytes. Returns 0, or 1 with a message in err.
int pf_emu_plan(int mode, int is_double, int64_t D, int64_t smem_limit, int64_t max_window,
                int64_t* out, char* err, int errlen) {
  Plan p;
  std::string msg;
  if (!make_plan(mode, is_double != 0, D, smem_limit, max_window, p, msg)) {
    set_error(err, errlen, msg);
    return 1;
  }
  out[0] = p.upt;
  out[1] = p.window;
  out[2] = p.splits;
  out[3] = p.packs;
  out[4] = p.smem_bytes;
  return 0;
}

// Runs one "launch" on host memory. Returns 0, or 1 with a message in err.
int pf_emu_launch(const LaunchArgs* a, int64_t smem_limit, int order_kind, uint64_t seed,
                  char* err, int errlen) {
  const std::string bad = check_launch_args(*a);
  if (!bad.empty()) {
    set_error(err, errlen, bad);
    return 1;
  }
  Plan pl;
  std::string msg;
  if (!make_plan(a->mode, a->is_double != 0, a->D, smem_limit, a->max_window, pl, msg)) {
    set_error(err, errlen, msg);
    return 1;
  }
  const int64_t n_own = a->mode == kBackwardY ? a->B : a->N;
  const int64_t br = a->is_double ? Geo<double>::BR : Geo<float>::BR;
  const int64_t grid_x = ceil_div(n_own, br);
  std::vector<unsigned char> smem((size_t)pl.smem_bytes + 16);
  unsigned char* base =
      (unsigned char*)(((uintptr_t)smem.data() + 15) & ~(uintptr_t)15);  // 16-byte aligned
  HostExec ex(order_kind, seed);
  const bool found = dispatch_instance(pl, [&](auto inst) {
    typedef decltype(inst) I;
    typedef typename I::T T;
    const Params<T> P = typed_params<T>(*a);
    for (int64_t by = 0; by < pl.splits; ++by)
      for (int64_t bx = 0; bx < grid_x; ++bx) {
        memset(base, 0xff, (size_t)pl.smem_bytes);  // NaN: shared memory starts undefined
        run_block<T, I::kUpt, I::kMode>(ex, P, pl, base, bx, by);
      }
  });
  if (!found) {
    set_error(err, errlen, "no kernel instance for the plan");
    return 1;
  }
  return 0;
}

}  // extern "C"
