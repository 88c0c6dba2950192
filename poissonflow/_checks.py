"""Input validation shared by every public entry point.

Every check runs before any kernel and raises an exception that names the argument. Kernels may
therefore assume: 2-D contiguous tensors on one device, one floating dtype, finite values,
non-negative weights with a positive sum, at least one charge.
"""

from __future__ import annotations

import math
import numbers

import torch

# Largest number of elements one input may have: C++ indexes with int64 and the packed copy of
# the charges must be allocatable; beyond 2**40 elements (4 TiB of float32) nothing is sensible.
MAX_NUMEL = 2**40


def check_tensor(t, name: str, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() > MAX_NUMEL:
        raise ValueError(f"{name} has {t.numel()} elements, more than the supported {MAX_NUMEL}")
    return t


def check_finite(t: torch.Tensor, name: str, *, dim: int | None = None) -> None:
    """NaN/inf check, and (with `dim`) a magnitude check: squared distances between points of
    that dimension must not overflow the dtype (4 * dim * max|t|^2 < the dtype's max), or the
    kernels would see r2 = inf and silently return wrong weights."""
    if not t.numel():
        return
    # one pass without a temporary (|t| would be a copy): amax = max(-min, max); NaN propagates
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    amax = max(-float(lo), float(hi))
    if not math.isfinite(amax):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    if dim is not None:
        limit = max_coordinate(t.dtype, dim)
        if amax > limit:
            raise ValueError(
                f"{name} has values up to {amax:.3g} in magnitude; squared distances in "
                f"{dim} dimensions would overflow {t.dtype} (limit {limit:.3g}); rescale the inputs"
            )


def max_coordinate(dtype: torch.dtype, dim: int) -> float:
    """Largest coordinate magnitude for which sum of squared differences stays finite."""
    return math.sqrt(torch.finfo(dtype).max / (4.0 * max(1, dim))) * 0.5


def check_scalar(value, name: str, *, minimum: float = 0.0, allow_equal: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if v < minimum or (not allow_equal and v == minimum):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")
    return v


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    """`value` as a float, finite and > 0 (>= 0 with allow_zero): the package's one check of a
    positive setting (a TypeError for a non-number, a ValueError naming `name` otherwise)."""
    return check_scalar(value, name, minimum=0.0, allow_equal=allow_zero)


def check_bool(value, name: str) -> bool:
    """`value` if it is a bool (not merely truthy), else a TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(value, name: str, minimum: int) -> int:
    """`value` as an int >= minimum (numpy integers accepted, bools refused), else a
    ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def resolve_device(device, *, types: tuple[str, ...] | None = None) -> torch.device:
    """A torch.device from "auto" (CUDA when available, else the CPU), a device string or a
    torch.device; a ValueError when the string names no device, when its type is not one of
    `types` (None: any), or when it asks for CUDA and CUDA is not available."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not isinstance(device, str):
        raise TypeError(f"device must be 'auto', a device string or a torch.device, got {device!r}")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}"
            ) from err
    if types is not None and dev.type not in types:
        raise ValueError(f"device must be one of {types} (or 'auto'), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but CUDA is not available")
    return dev


def check_field_inputs(x, charges, weights, power, eps, exclude=None):
    """Validates poisson_field's arguments; returns (power, eps) as floats.

    While torch.compile traces (`torch.compiler.is_compiling()`), the checks that read tensor
    values (NaN/inf, magnitudes, negative weights) are skipped: they would force graph breaks.
    Shapes, dtypes and devices are always checked."""
    values = not torch.compiler.is_compiling()
    check_tensor(x, "x", ndim=2)
    check_tensor(charges, "charges", ndim=2)
    if charges.shape[0] == 0:
        raise ValueError("charges is empty: the field needs at least one charge")
    if x.shape[1] != charges.shape[1]:
        raise ValueError(
            f"x and charges must have the same number of columns (dimension D): "
            f"x has {x.shape[1]}, charges has {charges.shape[1]}"
        )
    if x.shape[1] == 0:
        raise ValueError("x and charges have zero columns: the dimension D must be >= 1")
    if charges.dtype != x.dtype:
        raise TypeError(f"charges has dtype {charges.dtype} but x has {x.dtype}; they must match")
    if charges.device != x.device:
        raise ValueError(f"charges is on {charges.device} but x is on {x.device}")
    if values:
        check_finite(x, "x", dim=x.shape[1])
        check_finite(charges, "charges", dim=x.shape[1])
    if weights is not None:
        check_tensor(weights, "weights", ndim=1)
        if weights.shape[0] != charges.shape[0]:
            raise ValueError(
                f"weights must have one entry per charge: got {weights.shape[0]} for "
                f"{charges.shape[0]} charges"
            )
        if weights.dtype != x.dtype:
            raise TypeError(f"weights has dtype {weights.dtype} but x has {x.dtype}")
        if weights.device != x.device:
            raise ValueError(f"weights is on {weights.device} but x is on {x.device}")
        if values:
            check_finite(weights, "weights")
            if bool((weights < 0).any()):
                raise ValueError("weights must be non-negative")
            if not float(weights.detach().double().sum()) > 0.0:
                raise ValueError("weights must have a positive sum (all charges are zero)")
    if exclude is not None:
        check_exclude(exclude, x.shape[0], charges.shape[0], x.device, values)
    p = float(x.shape[1]) if power is None else check_scalar(power, "power")
    e = check_scalar(eps, "eps")
    if e > max_coordinate(x.dtype, 1):
        raise ValueError(f"eps = {e:.3g} is too large: eps^2 overflows {x.dtype}")
    # s = log w - (p/2) log r2 must stay far from the kernels' "no charge" sentinel (-1e30 in
    # float32): |log2 r2| <= 128, so p up to 1e20 is safe; nothing physical comes close.
    if p > 1e20:
        raise ValueError(f"power = {p:.3g} is too large (at most 1e20)")
    return p, e


def check_exclude(exclude, n_queries: int, n_charges: int, device, values: bool = True) -> None:
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be a torch.Tensor of charge indices, got {type(exclude)}")
    if exclude.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"exclude must hold int64 charge indices, got dtype {exclude.dtype}")
    if exclude.shape != (n_queries,):
        raise ValueError(
            f"exclude must have one entry per query, shape ({n_queries},); got "
            f"{tuple(exclude.shape)}"
        )
    if exclude.device != device:
        raise ValueError(f"exclude is on {exclude.device} but x is on {device}")
    if values and exclude.numel():
        lo, hi = int(exclude.min()), int(exclude.max())
        if lo < -1 or hi >= n_charges:
            raise ValueError(
                f"exclude must hold charge indices in [0, {n_charges}) or -1 (none); "
                f"got values in [{lo}, {hi}]"
            )
