// The one binding style of both extension modules: a kernel entry point takes keyword arguments
// named after the fields of its argument struct (field_args.h), filled here; an unknown keyword
// is a TypeError naming it, an absent one keeps the struct's default. Addresses arrive as Python
// ints. Also numerics(): the constants of field_numerics.h by name.
#pragma once

#include <pybind11/pybind11.h>

#include <stdint.h>

#include <string>
#include <type_traits>

#include "common/field_args.h"
#include "common/field_numerics.h"

namespace poissonflow {
namespace bind {

namespace py = pybind11;

template <typename F>
inline void assign(F& field, py::handle value) {
  if constexpr (std::is_pointer<F>::value)
    field = reinterpret_cast<F>(static_cast<uintptr_t>(value.cast<uint64_t>()));
  else
    field = value.cast<F>();
}

// `Args` from kwargs; keywords listed in `extra` are left for the caller.
template <class Args>
Args args_from_kwargs(const py::kwargs& kw, const char* function,
                      std::initializer_list<const char*> extra = {}) {
  Args a;
  size_t used = 0;
  for_each_field(a, [&](const char* name, auto& field) {
    if (kw.contains(name)) {
      try {
        assign(field, kw[name]);
      } catch (const py::cast_error&) {
        throw py::type_error(std::string(function) + ": argument '" + name +
                             "' has the wrong type");
      }
      ++used;
    }
  });
  for (const char* name : extra) used += kw.contains(name) ? 1 : 0;
  if (used != kw.size()) {
    for (auto item : kw) {
      const std::string key = item.first.cast<std::string>();
      bool known = false;
      for_each_field(a, [&](const char* name, auto&) { known = known || key == name; });
      for (const char* name : extra) known = known || key == name;
      if (!known) throw py::type_error(std::string(function) + ": unknown argument '" + key + "'");
    }
  }
  return a;
}

// The names of Args' fields, in declaration order (what a caller may pass).
template <class Args>
py::list field_names() {
  Args a;
  py::list out;
  for_each_field(a, [&](const char* name, auto&) { out.append(name); });
  return out;
}

inline py::dict numerics_dict() {
  py::dict d;
  numerics::for_each_constant([&](const char* name, double value, bool is_integer) {
    if (is_integer)
      d[name] = (int64_t)value;
    else
      d[name] = value;
  });
  return d;
}

}  // namespace bind
}  // namespace poissonflow
