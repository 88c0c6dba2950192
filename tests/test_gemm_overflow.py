"""The certified GEMM-form forward (poissonflow.kernels.triton._gemm) raises no floating-point
overflow
in its bounds: a recomputed pair's logit interval can reach far above the row's reference m_ref
(at the r2 floor its upper end is log2 w + s_cap_rel, thousands in log2 units for D = 129), and
2^(s_hi - m_ref) used to be taken on every lane and then dropped by a select, which Triton's
interpreter reports as "RuntimeWarning: overflow encountered in exp2" (the conformance cases
triton-gemm-interp D1 and near-coincident D = 129). The kernel now exponentiates only the lanes
it keeps; their values, and so v, log_scale, the certificate and the statistics, are unchanged
(checked bit for bit on every conformance shape and feature at four precision settings when the
change was made). On a GPU the compiled kernel gives inf silently; the checks still apply.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'poissonflow[triton]')")

from conformance.conformance_cases import field_case, near_coincident_case  # noqa: E402
from helpers import TOL_LS, TOL_V, field_errors  # noqa: E402

from poissonflow.kernels.triton import _gemm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


def _near():
    x, y = near_coincident_case()
    return dict(x=x.to(F32), y=y.to(F32), w=None, power=129.0, eps=0.0, exclude=None, eps_rows=None)


CASES = {
    "D1-weights": lambda: field_case(17, 70, 1, "weights", F32),
    "near-coincident-D129": _near,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_certified_forward_has_no_overflow(name):
    case = CASES[name]()
    on = {k: (t.to(DEV) if isinstance(t, torch.Tensor) else t) for k, t in case.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = _gemm.gemm_field_forward(
            on["x"], on["y"], on["w"], on["power"], on["eps"], on["exclude"], on["eps_rows"]
        )
    # the case reaches the lanes in question: pairs recomputed exactly
    assert int(res.stats[:, 0].sum()) > 0
    cpu = {k: case[k] for k in ("eps", "exclude", "eps_rows")}
    rel, _, ls_err = field_errors(
        case["x"],
        case["y"],
        res.v.cpu(),
        res.log_scale.cpu(),
        weights=case["w"],
        power=case["power"],
        **cpu,
    )
    assert rel <= TOL_V[F32] and ls_err <= TOL_LS[F32], (rel, ls_err)
    assert bool(torch.isfinite(res.certificate).all())
