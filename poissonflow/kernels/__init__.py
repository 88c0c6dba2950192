"""The field backends, one module (or package) per registry entry, named after it.

`reference` (float64 pure PyTorch, the oracle), `cpu` (C++ through `poissonflow._C`), `cuda`
(CUDA through `poissonflow._cuda`), `triton` (Triton kernels and their op pair) and
`triton_gemm` (the certified GEMM-form Triton field). Each implements the backend protocol of
docs/ARCHITECTURE.md; `poissonflow.registry` is the one table that names them. Backends import
only what lies below them: `poissonflow.ode` (the RK4 driver), `poissonflow._ext` (the compiled
modules) and, for the op pairs, `poissonflow.ops`. Nothing here is imported by
`import poissonflow` except the reference.
"""
