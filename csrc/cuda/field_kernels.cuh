// The device side of the field kernels: an executor that runs the block program of
// field_block.cuh on the GPU, the kernel template, and launch_instance(), which the files
// kernels_<mode>.cu instantiate (one file per mode so that the instances compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include "field_block.cuh"
#include "kernel_launch.h"

namespace poissonflow {
namespace cuda {

// Executor of run_block on the GPU: each thread runs its own share of every phase, and its
// ThreadState is a local object that the compiler keeps in registers (all indices are static
// after unrolling; ptxas -warn-spills in CMakeLists.txt reports any that spill).
struct DeviceExec {
  template <class S>
  struct Slot {
    S s;
    __device__ __forceinline__ S& operator()(int) { return s; }
  };
  template <class S>
  __device__ __forceinline__ Slot<S> states() {
    return Slot<S>();
  }
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f((int)threadIdx.x);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

template <typename T, int UPT, int M>
__global__ void __launch_bounds__(256) field_kernel(Params<T> P, Plan pl) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  run_block<T, UPT, M>(ex, P, pl, smem, (int64_t)blockIdx.x, (int64_t)blockIdx.y);
}

template <typename T, int UPT, int M>
cudaError_t launch_instance(const LaunchArgs& a, const Plan& pl, dim3 grid, cudaStream_t stream) {
  auto kernel = field_kernel<T, UPT, M>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)pl.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Geo<T>::kThreads, (size_t)pl.smem_bytes, stream>>>(typed_params<T>(a), pl);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace poissonflow

// Every instance that instances.h can dispatch to, for one mode.
#define PF_INSTANTIATE_MODE(M)                                                                   \
  namespace poissonflow {                                                                        \
  namespace cuda {                                                                               \
  template cudaError_t launch_instance<float, 1, M>(const LaunchArgs&, const Plan&, dim3,        \
                                                    cudaStream_t);                               \
  template cudaError_t launch_instance<float, 2, M>(const LaunchArgs&, const Plan&, dim3,        \
                                                    cudaStream_t);                               \
  template cudaError_t launch_instance<float, 3, M>(const LaunchArgs&, const Plan&, dim3,        \
                                                    cudaStream_t);                               \
  template cudaError_t launch_instance<float, 4, M>(const LaunchArgs&, const Plan&, dim3,        \
                                                    cudaStream_t);                               \
  template cudaError_t launch_instance<double, 1, M>(const LaunchArgs&, const Plan&, dim3,       \
                                                     cudaStream_t);                              \
  template cudaError_t launch_instance<double, 2, M>(const LaunchArgs&, const Plan&, dim3,       \
                                                     cudaStream_t);                              \
  template cudaError_t launch_instance<double, 4, M>(const LaunchArgs&, const Plan&, dim3,       \
                                                     cudaStream_t);                              \
  }                                                                                              \
  }
