// Compiled with the baseline flags only: it must run on any CPU of the architecture.
#include "dispatch.h"

#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#endif

namespace poissonflow {

#define PF_DECLARE_ISA(ns)                \
  namespace ns {                          \
  int field_forward(const FieldArgs& a);  \
  int field_backward(const FieldArgs& a); \
  int flow_steps(const FieldArgs& a);     \
  double pipe_rate(int op, int64_t iters, int threads, double param, bool is_double); \
  int pipe_op_count();                    \
  const char* pipe_op_name(int op);       \
  int vector_bytes();                     \
  }

PF_DECLARE_ISA(isa_generic)
#ifdef PF_HAVE_AVX2
PF_DECLARE_ISA(isa_avx2)
#endif
#ifdef PF_HAVE_AVX512
PF_DECLARE_ISA(isa_avx512)
#endif

namespace {

struct KernelTable {
  const char* name;
  bool (*supported)();
  int (*field_forward)(const FieldArgs&);
  int (*field_backward)(const FieldArgs&);
  int (*flow_steps)(const FieldArgs&);
  double (*pipe_rate)(int, int64_t, int, double, bool);
  int (*pipe_op_count)();
  const char* (*pipe_op_name)(int);
  int (*vector_bytes)();
};

bool always() { return true; }
#if defined(PF_HAVE_AVX2) || defined(PF_HAVE_AVX512)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}
#endif

#define PF_TABLE_ENTRY(name, ns, pred)                                                  \
  {name, pred, &ns::field_forward, &ns::field_backward, &ns::flow_steps, &ns::pipe_rate, \
   &ns::pipe_op_count, &ns::pipe_op_name, &ns::vector_bytes}

const KernelTable kTables[] = {
#ifdef PF_HAVE_AVX512
    PF_TABLE_ENTRY("avx512", isa_avx512, has_avx512),
#endif
#ifdef PF_HAVE_AVX2
    PF_TABLE_ENTRY("avx2", isa_avx2, has_avx2),
#endif
    PF_TABLE_ENTRY("generic", isa_generic, always),
};

const KernelTable& pick(const std::string& isa) {
  for (const KernelTable& t : kTables) {
    if (!t.supported()) continue;
    if (isa == "auto" || isa == t.name) return t;
  }
  throw std::invalid_argument("isa '" + isa + "' is not available on this CPU/build; available: " +
                              [] {
                                std::string s;
                                for (const auto& n : available_isas()) s += (s.empty() ? "" : ", ") + n;
                                return s;
                              }());
}

}  // namespace

std::string openmp_library() {
#ifdef _OPENMP
  // the address the extension's own reference to the runtime resolved to, and its file
  Dl_info info;
  void* fn = reinterpret_cast<void*>(&omp_get_max_threads);
  if (dladdr(fn, &info) && info.dli_fname) return info.dli_fname;
  return "unknown";
#else
  return "";
#endif
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const KernelTable& t : kTables)
    if (t.supported()) out.push_back(t.name);
  return out;
}

namespace {

// AMD family 25 (0x19: Zen 3 and Zen 4; of them only Zen 4 has AVX-512, so only it runs the
// avx512 copy that the choice concerns).
bool amd_family_25() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amd = ebx == 0x68747541u && edx == 0x69746e65u && ecx == 0x444d4163u;  // AuthenticAMD
  if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  unsigned int family = (eax >> 8) & 0xfu;
  if (family == 0xfu) family += (eax >> 20) & 0xffu;
  return family == 25u;
#else
  return false;
#endif
}

FieldArgs resolved(const FieldArgs& a) {
  FieldArgs b = a;
  b.broadcasts = resolve_broadcasts(a.broadcasts);
  return b;
}

}  // namespace

int resolve_broadcasts(int requested) {
  if (requested == 1 || requested == 2) return requested;
  static const int by_cpu = amd_family_25() ? 2 : 1;
  return by_cpu;
}

int field_forward(const FieldArgs& a, const std::string& isa) {
  return pick(isa).field_forward(resolved(a));
}

int field_backward(const FieldArgs& a, const std::string& isa) {
  return pick(isa).field_backward(resolved(a));
}

int flow_steps(const FieldArgs& a, const std::string& isa) {
  return pick(isa).flow_steps(resolved(a));
}

std::string chosen_isa(const std::string& isa) { return pick(isa).name; }

int vector_bytes(const std::string& isa) { return pick(isa).vector_bytes(); }

std::vector<std::string> pipe_ops() {
  const KernelTable& t = pick("auto");
  std::vector<std::string> out;
  for (int op = 0; op < t.pipe_op_count(); ++op) out.push_back(t.pipe_op_name(op));
  return out;
}

double pipe_rate(const std::string& op, int64_t iters, int threads, double param,
                 bool is_double, const std::string& isa) {
  const KernelTable& t = pick(isa);
  for (int i = 0; i < t.pipe_op_count(); ++i)
    if (op == t.pipe_op_name(i)) return t.pipe_rate(i, iters, threads, param, is_double);
  throw std::invalid_argument("unknown pipe operation '" + op + "'");
}

}  // namespace poissonflow
