// pybind11 module poissonflow._cuda: the CUDA kernels behind raw addresses, sizes and a stream
// handle (no libtorch, no CUDA header here: see launch.h). launch() takes the fields of
// LaunchArgs (common/field_args.h) as keyword arguments, the binding style of poissonflow._C too.
// poissonflow/kernels/cuda.py owns every buffer and validates every tensor; this layer only
// converts arguments and errors.
// Importing the module does not touch the GPU (the CUDA runtime is linked statically and starts
// on the first call), so it imports on machines without a driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdint.h>

#include <stdexcept>
#include <string>

#include "block_plan.h"
#include "common/bind_args.h"
#include "launch.h"

namespace py = pybind11;
using namespace poissonflow::cuda;

namespace {

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
  m.doc() = "poissonflow CUDA kernels (raw-address interface; use poissonflow.kernels.cuda)";
  m.attr("MODE_FORWARD") = (int)kForward;
  m.attr("MODE_FLOW") = (int)kFlow;
  m.attr("MODE_BACKWARD_X") = (int)kBackwardX;
  m.attr("MODE_BACKWARD_Y") = (int)kBackwardY;

  m.def(
      "launch",
      [](const py::kwargs& kw) {
        const LaunchArgs a = poissonflow::bind::args_from_kwargs<LaunchArgs>(kw, "launch");
        py::gil_scoped_release release;
        launch(a);
      },
      "Enqueue one kernel (asynchronous) on the given stream; keywords: the LaunchArgs fields "
      "(arg_names()). Raises RuntimeError with the CUDA error string on failure.");
  m.def("arg_names", &poissonflow::bind::field_names<LaunchArgs>,
        "The keyword arguments of launch() (LaunchArgs fields, csrc/common/field_args.h).");
  m.def("numerics", &poissonflow::bind::numerics_dict,
        "The kernels' numerical constants (sentinels, r2 floors, kTau, RK4 tableau) by name.");

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
