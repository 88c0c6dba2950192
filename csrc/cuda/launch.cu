// Host side of the CUDA kernels: plans a call, picks the kernel instance and launches it on the
// caller's stream; device queries for the binding. The kernels (forward, fused flow steps,
// backward dL/dx, backward dL/dy + dL/dw) are compiled in kernels_<mode>.cu from the block
// program of field_block.cuh, which the host emulator (emulate/) shares.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "instances.h"
#include "kernel_launch.h"
#include "launch.h"

namespace poissonflow {
namespace cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("poissonflow CUDA: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the duration of a call and restores the caller's device.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (prev >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
  }
};

}  // namespace

void launch(const LaunchArgs& a) {
  const std::string bad = check_launch_args(a);
  if (!bad.empty()) throw std::invalid_argument("poissonflow CUDA launch: " + bad);
  DeviceGuard guard(a.device);
  int smem_optin = 0;
  check(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device),
        "cudaDeviceGetAttribute");
  Plan pl;
  std::string err;
  if (!make_plan(a.mode, a.is_double != 0, a.D, smem_optin, a.max_window, pl, err))
    throw std::invalid_argument("poissonflow CUDA launch: " + err);
  const int64_t n_own = a.mode == kBackwardY ? a.B : a.N;
  if (n_own == 0) return;
  const int64_t br = a.is_double ? Geo<double>::BR : Geo<float>::BR;
  const int64_t grid_x = ceil_div(n_own, br);
  if (grid_x > 2147483647LL || pl.splits > 65535)
    throw std::invalid_argument("poissonflow CUDA launch: problem too large for one grid");
  const dim3 grid((unsigned)grid_x, (unsigned)pl.splits);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const bool found = dispatch_instance(pl, [&](auto inst) {
    typedef decltype(inst) I;
    check(launch_instance<typename I::T, I::kUpt, I::kMode>(a, pl, grid, stream), "kernel launch");
  });
  if (!found) throw std::logic_error("poissonflow CUDA launch: no kernel instance for the plan");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear: "no driver" / "no device" is an answer here, not an error
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  DeviceInfo info;
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.sm_count = prop.multiProcessorCount;
  check(cudaDeviceGetAttribute(&info.clock_khz, cudaDevAttrClockRate, device),
        "cudaDeviceGetAttribute(ClockRate)");
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  info.smem_optin = optin;
  return info;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

std::string compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define PF_STR2(...) #__VA_ARGS__
#define PF_STR(...) PF_STR2(__VA_ARGS__)
  return PF_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace poissonflow
