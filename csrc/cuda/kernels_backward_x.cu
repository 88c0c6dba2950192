// Kernel instances of mode kBackwardX (see instances.h for the list and field_kernels.cuh for the
// kernel). One file per mode: the four compile in parallel.
#include "field_kernels.cuh"

PF_INSTANTIATE_MODE(poissonflow::cuda::kBackwardX)
