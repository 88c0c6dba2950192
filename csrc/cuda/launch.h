// Host API of the CUDA kernels for the pybind11 binding (bindings_cuda.cpp). Plain C++: the
// binding is compiled by the host compiler and never includes a CUDA header. Every function
// reports CUDA errors as std::runtime_error carrying the CUDA error string.
#pragma once

#include <stdint.h>

#include <string>

#include "block_plan.h"

namespace poissonflow {
namespace cuda {

// Plans and enqueues one kernel on `a.stream` of device `a.device`; asynchronous.
void launch(const LaunchArgs& a);

// Number of visible CUDA devices; 0 (never an exception) when there is no driver or no device.
int device_count();

struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0, sm_count = 0, clock_khz = 0;
  int64_t smem_optin = 0;  // largest dynamic shared memory one block may opt in to
};
DeviceInfo device_info(int device);

int runtime_version();          // CUDA runtime linked into the module (e.g. 13000)
int driver_version();           // 0 when no driver is installed
std::string compiled_archs();   // the SASS/PTX targets this module was built for

}  // namespace cuda
}  // namespace poissonflow
