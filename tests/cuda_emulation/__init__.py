"""Host emulation of the CUDA kernels (csrc/cuda/emulate/), for tests on machines without a GPU."""
