// Run-time choice among the per-ISA copies of the CPU kernels (their arguments, with shapes:
// common/field_args.h). Every entry point returns 0 on success, non-zero if scratch could not be
// allocated; inputs are validated in Python before any of these runs.
#pragma once

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

}  // namespace poissonflow
