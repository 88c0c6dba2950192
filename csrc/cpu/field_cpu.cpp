// CPU kernels of the Poisson field, compiled once per instruction set (CMakeLists.txt passes
// -DPF_ISA_NS=... and the matching -m flags). dispatch.cpp picks a copy at run time.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernel_args.h"
#include "field_tile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace poissonflow {
namespace PF_ISA_NS {

template <typename T>
static int forward_impl(const FieldArgs& a) {
  Packed<T> pk;
  if (!pk.allocate(a.B, a.D)) return 1;
  pack_charges<T>((const T*)a.y, (const T*)a.w, pk);
  const int QT = query_tile_size<T>(a.D);
  const int64_t ntiles = (a.N + QT - 1) / QT;
  const T half_p = (T)(0.5 * a.power);
  int failed = 0;
#pragma omp parallel num_threads(a.num_threads) reduction(| : failed)
  {
    TileScratch<T> sc;
    if (!sc.allocate(QT, a.D)) {
      failed = 1;
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t i0 = t * QT;
        const int nq = (int)(a.N - i0 < QT ? a.N - i0 : QT);
        load_query_tile<T>(sc, a, i0, nq);
        field_tile<T>(sc, pk, half_p, nq);
        T* v = (T*)a.v + i0 * a.D;
        T* ls = (T*)a.log_scale + i0;
        memcpy(v, sc.out_v, sizeof(T) * nq * a.D);
        for (int q = 0; q < nq; ++q)
          ls[q] = (T)((double)sc.out_lse[q] * 0.69314718055994530942 - pk.log_wsum);
      }
    }
    sc.release();
  }
  pk.release();
  return failed;
}

int field_forward(const FieldArgs& a) {
  return a.is_double ? forward_impl<double>(a) : forward_impl<float>(a);
}

}  // namespace PF_ISA_NS
}  // namespace poissonflow
