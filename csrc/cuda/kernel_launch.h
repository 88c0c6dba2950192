// Declaration of the per-instance launcher, defined in field_kernels.cuh and explicitly
// instantiated in kernels_<mode>.cu. launch.cu sees only this declaration, so it never compiles
// a kernel itself.
#pragma once

#include <cuda_runtime.h>

#include "block_plan.h"

namespace poissonflow {
namespace cuda {

// Sets the instance's dynamic shared-memory size and enqueues it; returns the first CUDA error.
template <typename T, int UPT, int M>
cudaError_t launch_instance(const LaunchArgs& a, const Plan& pl, dim3 grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace poissonflow
