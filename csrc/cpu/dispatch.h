// Run-time choice among the per-ISA copies of the CPU kernels (their arguments, with shapes:
// common/field_args.h). Every entry point returns 0 on success, non-zero if scratch could not be
// allocated; inputs are validated in Python before any of these runs.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "common/field_args.h"

namespace poissonflow {

// Instruction sets compiled into this build that the running CPU supports, best first.
std::vector<std::string> available_isas();

// The file of the OpenMP runtime the kernels' parallel regions run on ("" when built without
// OpenMP): torch's own copy when torch was imported first (poissonflow/_ext.py).
std::string openmp_library();

// "auto" or one of available_isas(); throws std::invalid_argument otherwise.
int field_forward(const FieldArgs& a, const std::string& isa);
int field_backward(const FieldArgs& a, const std::string& isa);
int flow_steps(const FieldArgs& a, const std::string& isa);

// Phase A's broadcast operands (FieldArgs::broadcasts; simd.h vsub_broadcast): 0 (auto)
// resolves to 2, embedded in the arithmetic, on AMD family 25 (Zen 4, the one CPU of that family
// with AVX-512), where stand-alone 512-bit broadcast loads slow phase A's step by half, and to
// 1, one broadcast register shared by its subtractions, elsewhere. 1 and 2 are kept as given.
// Results do not depend on it.
int resolve_broadcasts(int requested);

// The instruction set "auto" (or `isa`) resolves to, and its vector width in bytes.
std::string chosen_isa(const std::string& isa);
int vector_bytes(const std::string& isa);

// The vector-pipe micro-benchmark (pipe_bench.cpp): the operations it knows, and vector
// operations per second of `threads` threads running one of them for `iters` iterations
// (param: p/2 for "pow_weight"). Throws std::invalid_argument for an unknown operation.
std::vector<std::string> pipe_ops();
double pipe_rate(const std::string& op, int64_t iters, int threads, double param,
                 bool is_double, const std::string& isa);

}  // namespace poissonflow
