"""Inputs of the conformance suite: shapes and features, built in float64 and rounded to the
dtype under test (the reference then sees exactly the rounded values).

Shapes (N queries, B charges, D dimensions): N = 0, B = 1, D = 1, 3, 33, 129, all ragged (no
multiple of any tile: the interpreter's tiles are 16 x 16 x 32, the emulator's and the CPU's
differ, so N, B up to 53 span several tiles with ragged edges).
"""

from __future__ import annotations

import torch

F64 = torch.float64

# (id, (N, B, D))
SHAPES = [
    ("N0", (0, 5, 3)),
    ("N1-B1-D1", (1, 1, 1)),
    ("B1", (7, 1, 3)),
    ("D1", (17, 70, 1)),
    ("D3", (19, 21, 3)),
    ("D33", (37, 53, 33)),
    ("D129", (23, 19, 129)),
]

# Field features, each checked on one ragged shape.
FEATURES = [
    "plain",
    "weights",
    "power",
    "eps",
    "exclude",
    "eps_rows",
    "combined",
    "coincident",
    "dead-rows",
    "zero-weight-nearest",
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def field_case(N, B, D, feature, dtype, *, seed=0, device="cpu"):
    """dict(x, y, w, power, eps, exclude, eps_rows) for one feature, in `dtype` on `device`
    (exclude int64; None where the feature does not use an input)."""
    g = _gen(seed + 31 * N + 7 * B + D)
    x = torch.randn(N, D, generator=g, dtype=F64)
    y = torch.randn(B, D, generator=g, dtype=F64)
    case = dict(w=None, power=float(D), eps=0.0, exclude=None, eps_rows=None)
    if feature == "weights":
        w = torch.rand(B, generator=g, dtype=F64) + 0.1
        w[::4] = 0.0  # zero-weight charges contribute nothing (and have a finite d/dw)
        if not bool((w > 0).any()):
            w[0] = 1.0
        case["w"] = w
    elif feature == "power":
        case["power"] = D + 1.7  # not an integer, not D
    elif feature == "eps":
        case["eps"] = 0.3
    elif feature == "exclude":
        case["exclude"] = torch.randint(-1, B, (N,), generator=g)
    elif feature == "eps_rows":
        case["eps_rows"] = torch.rand(N, generator=g, dtype=F64) * 0.5 + 0.05
    elif feature == "combined":
        # exclude and eps_rows together, power 2.5 and an eps that eps_rows replaces
        case["exclude"] = torch.randint(-1, B, (N,), generator=g)
        case["eps_rows"] = torch.rand(N, generator=g, dtype=F64) * 0.5
        case["power"], case["eps"] = 2.5, 0.3
    elif feature == "coincident":
        # Queries exactly on charges, eps = 0: r2 = 0 is floored at the smallest normal number
        # of the input dtype; that charge dominates and contributes exactly 0 to v.
        k = min(N, B, 5)
        x[:k] = y[:k]
    elif feature == "dead-rows":
        # Only charge 1 has weight; queries 0 and 2 exclude it: no charge reaches them.
        w = torch.zeros(B, dtype=F64)
        w[min(1, B - 1)] = 1.5
        ex = torch.full((N,), -1, dtype=torch.int64)
        ex[0:N:2] = min(1, B - 1)
        case["w"], case["exclude"] = w, ex
    elif feature == "zero-weight-nearest":
        # Zero-weight charges much closer to a query than every live charge: one exactly on
        # query 0 (r2 floored), one 1e-3 from query 1, power 40. pi / w = 2^(-(p/2) log2 r2 -
        # lse) overflows there (in float64 too at the floor), so a backward forming
        # pi = (pi / w) * w gets inf * 0 = NaN; such a charge has pi = 0 and no gradient but its
        # dL/dw (which does overflow: not compared).
        w = torch.rand(B, generator=g, dtype=F64) + 0.1
        k = min(N, B, 2)
        w[:k] = 0.0
        if k < B:
            step = torch.randn(D, generator=g, dtype=F64)
            x[:k] = y[:k]
            if k > 1:
                x[1] = y[1] + 1e-3 * step / step.norm()
        case["w"], case["power"] = w, 40.0
    elif feature != "plain":
        raise ValueError(feature)

    def cast(t):
        if t is None:
            return None
        if not t.is_floating_point():
            return t.to(device)
        return t.to(dtype).to(device)

    case["x"], case["y"] = cast(x), cast(y)
    case["w"], case["exclude"], case["eps_rows"] = (
        cast(case["w"]),
        cast(case["exclude"]),
        cast(case["eps_rows"]),
    )
    return case


def near_coincident_case(N=12, B=24, D=129, dist=1e-3, norm=10.0, seed=11):
    """Queries 1e-3 from a charge of norm 10 with a near twin charge ~1e-3 away (docs/DESIGN.md
    "The field operator"'s trap: r2 as |x|^2 + |y|^2 - 2 x.y is garbage here; the ratio of the two
    competing weights (r2_a / r2_b)^(p/2) must be right). float64 masters."""
    g = _gen(seed)
    y = torch.randn(B, D, generator=g, dtype=F64)
    y = norm * y / y.norm(dim=1, keepdim=True)
    u = torch.randn(2 * N, D, generator=g, dtype=F64)
    u = dist * u / u.norm(dim=1, keepdim=True)
    y[1 : 2 * N : 2] = y[0 : 2 * N : 2] + u[:N]
    x = y[0 : 2 * N : 2] + u[N:]
    return x, y


def upstream(N, D, dtype, *, seed=5, device="cpu"):
    """Random upstream gradients (gv, gl), rounded to `dtype` (the reference gets the same)."""
    g = _gen(seed)
    gv = torch.randn(N, D, generator=g, dtype=F64).to(dtype).to(device)
    gl = torch.randn(N, generator=g, dtype=F64).to(dtype).to(device)
    return gv, gl


def to_device(t, device):
    return None if t is None else t.to(device)
