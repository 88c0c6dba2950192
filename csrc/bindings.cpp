// pybind11 bindings of the CPU kernels. They take raw addresses and sizes, not tensors, so the
// extension does not link libtorch (no ABI coupling to a torch version). The Python layer
// (poissonflow/_cpu.py) validates every argument and owns every buffer; here the GIL is released
// around the compute and allocation failures become MemoryError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include "cpu/dispatch.h"

namespace py = pybind11;
using namespace poissonflow;

namespace {

template <typename P>
P* as_ptr(uintptr_t addr) {
  return reinterpret_cast<P*>(addr);
}

FieldArgs make_field_args(uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t exclude,
                          uintptr_t eps2_rows, int64_t N, int64_t B, int64_t D, double power,
                          double eps2, bool is_double, int num_threads) {
  FieldArgs a;
  a.x = as_ptr<const void>(x);
  a.y = as_ptr<const void>(y);
  a.w = as_ptr<const void>(w);
  a.exclude = as_ptr<const int64_t>(exclude);
  a.eps2_rows = as_ptr<const void>(eps2_rows);
  a.N = N;
  a.B = B;
  a.D = D;
  a.power = power;
  a.eps2 = eps2;
  a.is_double = is_double;
  a.num_threads = num_threads > 0 ? num_threads : 1;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "poissonflow CPU kernels (raw-pointer interface; use poissonflow.poisson_field)";

  m.def("available_isas", &available_isas,
        "Instruction sets compiled into this build that this CPU supports, best first.");

  m.def(
      "field_forward",
      [](uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t exclude, uintptr_t eps2_rows,
         int64_t N, int64_t B, int64_t D, double power, double eps2, bool is_double,
         uintptr_t v, uintptr_t log_scale, int num_threads, const std::string& isa) {
        FieldArgs a = make_field_args(x, y, w, exclude, eps2_rows, N, B, D, power, eps2,
                                      is_double, num_threads);
        a.v = as_ptr<void>(v);
        a.log_scale = as_ptr<void>(log_scale);
        int rc;
        {
          py::gil_scoped_release release;
          rc = field_forward(a, isa);
        }
        if (rc != 0) throw std::bad_alloc();
      },
      py::arg("x"), py::arg("y"), py::arg("w"), py::arg("exclude"), py::arg("eps2_rows"),
      py::arg("N"), py::arg("B"), py::arg("D"), py::arg("power"), py::arg("eps2"),
      py::arg("is_double"), py::arg("v"), py::arg("log_scale"), py::arg("num_threads"),
      py::arg("isa"));

  m.def(
      "field_backward",
      [](uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t exclude, uintptr_t eps2_rows,
         int64_t N, int64_t B, int64_t D, double power, double eps2, bool is_double,
         uintptr_t v, uintptr_t log_scale, uintptr_t gv, uintptr_t gl, uintptr_t gx,
         uintptr_t gy, uintptr_t gw, int num_threads, const std::string& isa) {
        FieldBackwardArgs b;
        b.fwd = make_field_args(x, y, w, exclude, eps2_rows, N, B, D, power, eps2, is_double,
                                num_threads);
        b.fwd.v = as_ptr<void>(v);
        b.fwd.log_scale = as_ptr<void>(log_scale);
        b.gv = as_ptr<const void>(gv);
        b.gl = as_ptr<const void>(gl);
        b.gx = as_ptr<void>(gx);
        b.gy = as_ptr<void>(gy);
        b.gw = as_ptr<void>(gw);
        int rc;
        {
          py::gil_scoped_release release;
          rc = field_backward(b, isa);
        }
        if (rc != 0) throw std::bad_alloc();
      },
      py::arg("x"), py::arg("y"), py::arg("w"), py::arg("exclude"), py::arg("eps2_rows"),
      py::arg("N"), py::arg("B"), py::arg("D"), py::arg("power"), py::arg("eps2"),
      py::arg("is_double"), py::arg("v"), py::arg("log_scale"), py::arg("gv"), py::arg("gl"),
      py::arg("gx"), py::arg("gy"), py::arg("gw"), py::arg("num_threads"), py::arg("isa"));

  m.def(
      "flow_steps",
      [](uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t exclude, int64_t N, int64_t B,
         int64_t D, double power, bool is_double, uintptr_t t0, uintptr_t dt, int64_t n_steps,
         int solver, uintptr_t x_out, int num_threads, const std::string& isa) {
        FlowArgs f;
        f.field = make_field_args(x, y, w, exclude, 0, N, B, D, power, 0.0, is_double,
                                  num_threads);
        f.t0 = as_ptr<const double>(t0);
        f.dt = as_ptr<const double>(dt);
        f.n_steps = n_steps;
        f.solver = solver;
        f.x_out = as_ptr<void>(x_out);
        int rc;
        {
          py::gil_scoped_release release;
          rc = flow_steps(f, isa);
        }
        if (rc != 0) throw std::bad_alloc();
      },
      py::arg("x"), py::arg("y"), py::arg("w"), py::arg("exclude"), py::arg("N"), py::arg("B"),
      py::arg("D"), py::arg("power"), py::arg("is_double"), py::arg("t0"), py::arg("dt"),
      py::arg("n_steps"), py::arg("solver"), py::arg("x_out"), py::arg("num_threads"),
      py::arg("isa"));

#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
