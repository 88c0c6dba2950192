// pybind11 bindings of the CPU kernels. Each entry point takes the fields of FieldArgs
// (common/field_args.h) as keyword arguments, addresses as ints, and `isa`; the extension never
// sees a tensor, so it does not link libtorch (no ABI coupling to a torch version). The Python
// layer (poissonflow/kernels/cpu.py) validates every argument and owns every buffer; here the GIL is
// released around the compute and allocation failures become MemoryError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include <string>

#include "common/bind_args.h"
#include "cpu/dispatch.h"

namespace py = pybind11;
using namespace poissonflow;

namespace {

typedef int (*Entry)(const FieldArgs&, const std::string&);

// One keyword-argument entry point: FieldArgs from the keywords, the kernel without the GIL.
void call(Entry entry, const char* name, const py::kwargs& kw) {
  FieldArgs a = bind::args_from_kwargs<FieldArgs>(kw, name, {"isa"});
  const std::string isa = kw.contains("isa") ? kw["isa"].cast<std::string>() : "auto";
  if (a.num_threads < 1) a.num_threads = 1;
  int rc;
  {
    py::gil_scoped_release release;
    rc = entry(a, isa);
  }
  if (rc != 0) throw std::bad_alloc();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "poissonflow CPU kernels (keyword, raw-address interface; use poisson_field)";

  m.def("openmp_library", &openmp_library,
        "File of the OpenMP runtime the kernels run on (torch's copy when torch is imported "
        "first; '' without OpenMP)");
  m.def("available_isas", &available_isas,
        "Instruction sets compiled into this build that this CPU supports, best first.");

  m.def(
      "field_forward", [](const py::kwargs& kw) { call(&field_forward, "field_forward", kw); },
      "v and log_scale of queries x against charges y; keywords: the FieldArgs fields "
      "(arg_names()) and isa.");
  m.def(
      "field_backward", [](const py::kwargs& kw) { call(&field_backward, "field_backward", kw); },
      "dL/dx, dL/dy, dL/dw (null outputs are not computed); keywords as for field_forward.");
  m.def(
      "flow_steps", [](const py::kwargs& kw) { call(&flow_steps, "flow_steps", kw); },
      "n_steps fused Euler (solver 0) or RK4 (solver 1) steps; keywords as for field_forward.");
  m.def("chosen_isa", &chosen_isa, py::arg("isa") = "auto",
        "The instruction set the dispatcher runs for `isa` ('auto': the best this CPU has).");
  m.def("vector_bytes", &vector_bytes, py::arg("isa") = "auto",
        "Vector width in bytes of an instruction set's kernels.");
  m.def("resolve_broadcasts", &resolve_broadcasts, py::arg("requested") = 0,
        "Phase A's broadcast operands for a request (0 auto: by CPU; 1 shared; 2 embedded).");
  m.def("pipe_ops", &pipe_ops, "Operations of the vector-pipe micro-benchmark (pipe_rate).");
  m.def(
      "pipe_rate",
      [](const std::string& op, int64_t iters, int threads, double param, bool is_double,
         const std::string& isa) {
        py::gil_scoped_release release;
        return pipe_rate(op, iters, threads < 1 ? 1 : threads, param, is_double, isa);
      },
      py::arg("op"), py::arg("iters") = 1000000, py::arg("threads") = 1, py::arg("param") = 0.0,
      py::arg("is_double") = false, py::arg("isa") = "auto",
      "Vector operations per second of `threads` threads running `op` (pipe_ops()) in the "
      "kernels' instruction set: the micro-benchmark behind bench/ceiling.py.");
  m.def("arg_names", &bind::field_names<FieldArgs>,
        "The keyword arguments of the kernel entry points (FieldArgs fields), and isa.");
  m.def("numerics", &bind::numerics_dict,
        "The kernels' numerical constants (sentinels, r2 floors, kTau, RK4 tableau) by name.");

#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
