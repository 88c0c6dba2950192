// pybind11 module poissonflow._cuda: the CUDA kernels behind raw addresses, sizes and a stream
// handle (no libtorch, no CUDA header here: see launch.h). poissonflow/_cuda_backend.py owns
// every buffer and validates every tensor; this layer only converts arguments and errors.
// Importing the module does not touch the GPU (the CUDA runtime is linked statically and starts
// on the first call), so it imports on machines without a driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include <stdexcept>
#include <string>

#include "block_plan.h"
#include "launch.h"

namespace py = pybind11;
using namespace poissonflow::cuda;

namespace {

// LaunchArgs fields by name (the keys poissonflow/_cuda_backend.py passes).
LaunchArgs args_from_dict(const py::dict& d) {
  LaunchArgs a;
  struct U64 { const char* name; uint64_t LaunchArgs::*field; };
  struct I64 { const char* name; int64_t LaunchArgs::*field; };
  struct F64 { const char* name; double LaunchArgs::*field; };
  struct I32 { const char* name; int32_t LaunchArgs::*field; };
  static const U64 u64[] = {
      {"x", &LaunchArgs::x},         {"y", &LaunchArgs::y},         {"w", &LaunchArgs::w},
      {"exclude", &LaunchArgs::exclude}, {"eps_rows", &LaunchArgs::eps_rows},
      {"v", &LaunchArgs::v},         {"lse2", &LaunchArgs::lse2},   {"gv", &LaunchArgs::gv},
      {"lse2_in", &LaunchArgs::lse2_in}, {"delta", &LaunchArgs::delta}, {"gl", &LaunchArgs::gl},
      {"gx", &LaunchArgs::gx},       {"gy", &LaunchArgs::gy},       {"gwsum", &LaunchArgs::gwsum},
      {"t0", &LaunchArgs::t0},       {"dt", &LaunchArgs::dt},       {"comb", &LaunchArgs::comb},
      {"stream", &LaunchArgs::stream}};
  static const I64 i64[] = {{"N", &LaunchArgs::N},   {"B", &LaunchArgs::B},
                            {"D", &LaunchArgs::D},   {"ld", &LaunchArgs::ld},
                            {"n_steps", &LaunchArgs::n_steps},
                            {"max_window", &LaunchArgs::max_window}};
  static const F64 f64[] = {{"eps2", &LaunchArgs::eps2}, {"power", &LaunchArgs::power},
                            {"tiny", &LaunchArgs::tiny}};
  static const I32 i32[] = {{"mode", &LaunchArgs::mode}, {"is_double", &LaunchArgs::is_double},
                            {"solver", &LaunchArgs::solver}, {"device", &LaunchArgs::device}};
  size_t used = 0;
  for (const auto& f : u64)
    if (d.contains(f.name)) { a.*(f.field) = d[f.name].cast<uint64_t>(); ++used; }
  for (const auto& f : i64)
    if (d.contains(f.name)) { a.*(f.field) = d[f.name].cast<int64_t>(); ++used; }
  for (const auto& f : f64)
    if (d.contains(f.name)) { a.*(f.field) = d[f.name].cast<double>(); ++used; }
  for (const auto& f : i32)
    if (d.contains(f.name)) { a.*(f.field) = d[f.name].cast<int32_t>(); ++used; }
  if (used != d.size()) {
    std::string names;
    for (auto item : d) names += " " + item.first.cast<std::string>();
    throw std::invalid_argument("poissonflow._cuda.launch: unknown argument among:" + names);
  }
  return a;
}

py::dict plan_dict(const Plan& p) {
  py::dict d;
  d["upt"] = p.upt;
  d["window"] = p.window;
  d["splits"] = p.splits;
  d["packs"] = p.packs;
  d["smem_bytes"] = p.smem_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "poissonflow CUDA kernels (raw-address interface; use poissonflow._cuda_backend)";
  m.attr("MODE_FORWARD") = (int)kForward;
  m.attr("MODE_FLOW") = (int)kFlow;
  m.attr("MODE_BACKWARD_X") = (int)kBackwardX;
  m.attr("MODE_BACKWARD_Y") = (int)kBackwardY;

  m.def(
      "launch",
      [](const py::dict& d) {
        const LaunchArgs a = args_from_dict(d);
        py::gil_scoped_release release;
        launch(a);
      },
      py::arg("args"),
      "Enqueue one kernel (asynchronous) on args['stream']; the keys are the LaunchArgs fields "
      "of csrc/cuda/block_plan.h. Raises RuntimeError with the CUDA error string on failure.");

  m.def(
      "plan",
      [](int mode, bool is_double, int64_t D, int64_t smem_limit, int64_t max_window) {
        Plan p;
        std::string err;
        if (!make_plan(mode, is_double, D, smem_limit, max_window, p, err))
          throw std::invalid_argument(err);
        return plan_dict(p);
      },
      py::arg("mode"), py::arg("is_double"), py::arg("D"), py::arg("smem_limit"),
      py::arg("max_window") = 0,
      "Launch geometry for a call (no GPU needed); raises ValueError when none fits.");

  m.def("device_count", &device_count, "Visible CUDA devices (0 without a driver or a GPU).");
  m.def(
      "device_info",
      [](int device) {
        const DeviceInfo i = device_info(device);
        py::dict d;
        d["name"] = i.name;
        d["major"] = i.major;
        d["minor"] = i.minor;
        d["sm_count"] = i.sm_count;
        d["clock_khz"] = i.clock_khz;
        d["smem_optin"] = i.smem_optin;
        return d;
      },
      py::arg("device"));
  m.def("runtime_version", &runtime_version, "CUDA runtime version linked into the module.");
  m.def("driver_version", &driver_version, "Installed CUDA driver version, 0 if none.");
  m.def("compiled_archs", &compiled_archs, "GPU architectures compiled into the module.");
}
