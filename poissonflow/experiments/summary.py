"""Numbers over seeds, shared by both studies' summaries (report.summarise and
ssl_report.summarise)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["_stats"]


def _stats(values: list[float]) -> dict[str, float] | None:
    """Mean, std (ddof 1), n, min and max of the values that are numbers (None and NaN
    skipped); None when there are none. Shared by both drivers."""
    vals = [
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    if not vals:
        return None
    arr = np.asarray(vals)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "n": len(arr),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
