// The kernel instances that exist, and the choice among them for a plan: shared by the CUDA
// launcher and the host emulator so that both run the same instance for the same call.
//   element type  float (float32, bfloat16 and float16 inputs) or double
//   UPT           register units per thread: float 1, 2, 3, 4; double 1, 2, 4 (block_plan.h)
//   mode          forward, flow, backward dL/dx, backward dL/dy + dL/dw
#pragma once

#include "block_plan.h"

namespace poissonflow {
namespace cuda {

template <typename T_, int UPT_, int M_>
struct Instance {
  typedef T_ T;
  static constexpr int kUpt = UPT_;
  static constexpr int kMode = M_;
};

template <typename T, int M, class F>
inline bool dispatch_upt(int upt, F&& f) {
  switch (upt) {
    case 1: f(Instance<T, 1, M>()); return true;
    case 2: f(Instance<T, 2, M>()); return true;
    case 3:  // float only: a double instance of 3 units would be a fifth double kernel
      if constexpr (sizeof(T) == 4) {
        f(Instance<T, 3, M>());
        return true;
      } else {
        return false;
      }
    case 4: f(Instance<T, 4, M>()); return true;
    default: return false;
  }
}

template <typename T, class F>
inline bool dispatch_mode(int mode, int upt, F&& f) {
  switch (mode) {
    case kForward: return dispatch_upt<T, kForward>(upt, f);
    case kFlow: return dispatch_upt<T, kFlow>(upt, f);
    case kBackwardX: return dispatch_upt<T, kBackwardX>(upt, f);
    case kBackwardY: return dispatch_upt<T, kBackwardY>(upt, f);
    default: return false;
  }
}

// Calls f(Instance<T, UPT, M>()) for the plan's instance; false if there is none.
template <class F>
inline bool dispatch_instance(const Plan& pl, F&& f) {
  return pl.is_double ? dispatch_mode<double>(pl.mode, pl.upt, f)
                      : dispatch_mode<float>(pl.mode, pl.upt, f);
}

}  // namespace cuda
}  // namespace poissonflow
