"""The field network and its settings: the MLP, the presets, and how a preset and the
constructor's arguments become the settings of one fit (`resolve_settings`).

Presets (every value can be overridden by the matching argument):

| setting | None (default) | "blog" | "pfgm" |
|---|---|---|---|
| network | Linear(d+1, h)-ReLU x depth, Linear(h, d+1); h = d + 1, depth = 2 | same | same |
| M | PFGM's rule | 20 | PFGM's rule |
| tau | 0.03 | 0.03 | 0.03 |
| sigma | 0.01 x data norm | 0.01 | 0.01 |
| gamma | 0.05 x data norm | 0.3 | 5 |
| restrict_M | False | False | True |
| large / small batch | 1024 / 128 | 1024 / 128 | 4096 / 128 |
| epochs | 200 | 200 | 200 (PFGM: 1.3M iterations) |
| lr (Adam) | 1e-3 | 1e-3 (torch default) | 2e-4 |
| grad_clip | None | None | 2.0 (PFGM clips at 1 the gradient of loss / 2) |
| ema (weight averaging) | 0.99 | None | 0.9999 |
| flow | log-z RK4 x 32, sigma..z_max | radial Euler 100 x 0.01 from 0 | RK4 x 32, 1e-3..z_max |
| loss / shuffle / drop_last | sum / True / True | sum / True / True | sum / True / True |
| patience / eval_every | None (fixed epochs) / 10 | same | same |

"blog-faithful" is "blog" with loss "mean", shuffle False, drop_last False (the blog's code).

"data norm" is sqrt(mean ||x||^2) (poissonflow.learned.targets.data_norm). M's rule and
z_max: poissonflow.learned.targets.pfgm_M / pfgm_z_max. ema is the decay of an exponential
moving average of the weights with PFGM's warm-up (models/ema.py); the fitted network holds
the average (0 disables).

Why the default preset differs from the blog's (measured on the 2-D toy of tests/test_learned.py,
16384 charges, width 128, 800 iterations, seeds 0-5): sigma, gamma and the horizon are lengths,
so they are taken in units of the data norm (training on 10 x the features then learns 10 x the
field; for unit-norm features sigma is the blog's 0.01). gamma only weights the loss (the
target's direction is that of v~ for any gamma); 0.05 instead of 0.3 weights the points just
above the plane more and raised the mean cosine to the exact field on held-out perturbed points
from 0.948-0.961 to 0.975-0.976. Averaging the weights (ema 0.99) removed a seed-dependent drift
of the far field: the flow's end azimuth had KS p between 1e-4 and 0.4 without it, 0.2-0.7
with it. The blog's M = 20 trains only within (1.03)^20 sigma sqrt(d) of the data, while its
flow climbs to radius sqrt(3); PFGM's rule covers the whole climb. The width d + 1 is the
blog's; in very low dimension it is too narrow (the toy uses 128).

The blog's flow (preset "blog", poissonflow.flow.field_flow with parameterization "radial"):
each point starts on the plane, y~ = (x, 0), and takes 100 Euler steps y~ <- y~ + delta f /
(f . y~) with delta = 0.01, f the network's field. Along the exact ODE d(|y~|^2 / 2)/ds = 1, so
|y~|^2 / 2 rises by delta per unit step; one Euler step raises it by delta + delta^2 |f|^2 /
(2 (f . y~)^2), i.e. by at least delta. A unit feature therefore ends at radius >= sqrt(1 + 2 *
100 * 0.01) = sqrt(3). The update does not depend on the sign or the scale of f, and is undefined
where f . y~ = 0 (there flow.py skips the step and counts it). The origin, not the data's
centre, is the centre of the radial motion (the blog's features are L2-normalised).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_positive
from .targets import data_norm, pfgm_M, pfgm_z_max

__all__ = ["PRESETS", "LOSSES", "PRESET_SETTINGS", "FLOWS", "SETTINGS", "mlp", "resolve_settings"]

PRESETS = (None, "blog", "pfgm", "blog-faithful")
LOSSES = ("sum", "mean")

# "auto" values are resolved from the data in fit(); "norm:<k>" means k x the data norm.
PRESET_SETTINGS: dict[Any, dict[str, Any]] = {
    None: {
        "hidden": "auto",
        "depth": 2,
        "M": "auto",
        "tau": 0.03,
        "sigma": "norm:0.01",
        "gamma": "norm:0.05",
        "restrict_M": False,
        "large_batch": 1024,
        "small_batch": 128,
        "epochs": 200,
        "lr": 1e-3,
        "grad_clip": None,
        "ema": 0.99,
        "z_min": "sigma",
        "z_max": "auto",
        "loss": "sum",
        "shuffle": True,
        "drop_last": True,
        "patience": None,
        "eval_every": 10,
    },
    "blog": {
        "hidden": "auto",
        "depth": 2,
        "M": 20.0,
        "tau": 0.03,
        "sigma": 0.01,
        "gamma": 0.3,
        "restrict_M": False,
        "large_batch": 1024,
        "small_batch": 128,
        "epochs": 200,
        "lr": 1e-3,
        "grad_clip": None,
        "ema": None,
        "z_min": 0.0,
        "z_max": "radial",
        "loss": "sum",
        "shuffle": True,
        "drop_last": True,
        "patience": None,
        "eval_every": 10,
    },
    "pfgm": {
        "hidden": "auto",
        "depth": 2,
        "M": "auto",
        "tau": 0.03,
        "sigma": 0.01,
        "gamma": 5.0,
        "restrict_M": True,
        "large_batch": 4096,
        "small_batch": 128,
        "epochs": 200,
        "lr": 2e-4,
        "grad_clip": 2.0,
        "ema": 0.9999,
        "z_min": 1e-3,
        "z_max": "auto",
        "loss": "sum",
        "shuffle": True,
        "drop_last": True,
        "patience": None,
        "eval_every": 10,
    },
}
# The blog's code where it differs from the "blog" preset (docs/BLOG_FAITHFULNESS.md): its
# loss is the mean over the d + 1 outputs (reduce_op = torch.mean), its loader is an
# unshuffled DataLoader(batch_size=1024) that keeps the incomplete last batch, so the same
# fixed large batches come every epoch and only the first 128 rows of each are ever perturbed.
# Its field network keeps PyTorch's default initialisation (its N(0, 0.02) init is the
# encoder's only), as the package's does.
PRESET_SETTINGS["blog-faithful"] = dict(
    PRESET_SETTINGS["blog"], loss="mean", shuffle=False, drop_last=False
)
# The ODE each preset flows with (LearnedField.default_flow, poissonflow.transform's arguments).
FLOWS = {
    None: {"parameterization": "logz", "solver": "rk4", "steps": 32},
    "blog": {
        "parameterization": "radial",
        "solver": "euler",
        "steps": 100,
        "delta": 0.01,
        "output": "raw",
    },
    "pfgm": {"parameterization": "logz", "solver": "rk4", "steps": 32},
}
FLOWS["blog-faithful"] = dict(FLOWS["blog"])
# the settings a preset fills in and a constructor argument overrides
SETTINGS = tuple(PRESET_SETTINGS[None])


def mlp(d: int, hidden: int, depth: int) -> torch.nn.Sequential:
    """Linear(d+1, h)-ReLU, (depth - 1) x Linear(h, h)-ReLU, Linear(h, d+1): the blog's network
    for h = d + 1, depth = 2."""
    layers: list[torch.nn.Module] = []
    width = d + 1
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, d + 1))
    return torch.nn.Sequential(*layers)


def resolve_settings(preset, given: dict[str, Any], X: torch.Tensor) -> dict[str, Any]:
    """The settings of a fit on X (N, d): the preset's, overridden by the `given` values that
    are not None, with the data-dependent ones ("auto", "norm:<k>", "sigma", "radial")
    computed, and what a single parameter constraint cannot say checked (small_batch <=
    large_batch, z_min < z_max, values resolved from the data)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    s = dict(PRESET_SETTINGS[preset])
    for k in SETTINGS:
        if given.get(k) is not None:
            s[k] = given[k]
    n, d = X.shape
    norm = data_norm(X)
    if not norm > 0:
        raise ValueError("features are all zero: the data norm that sets the scale is 0")
    for k in ("sigma", "gamma"):
        if isinstance(s[k], str) and s[k].startswith("norm:"):
            s[k] = float(s[k][5:]) * norm
    if s["hidden"] == "auto":
        s["hidden"] = d + 1
    for k, least in (
        ("hidden", 1),
        ("depth", 0),
        ("large_batch", 1),
        ("small_batch", 1),
        ("epochs", 1),
        ("eval_every", 1),
    ):
        s[k] = check_int(s[k], k, least)
    if s["small_batch"] > s["large_batch"]:
        # the perturbed points are the head of each large batch of charges
        raise ValueError(
            f"small_batch ({s['small_batch']}) must be <= large_batch "
            f"({s['large_batch']}): the perturbed points are taken from the large batch"
        )
    for k in ("tau", "sigma", "lr"):
        s[k] = check_positive(s[k], k)
    s["gamma"] = check_positive(s["gamma"], "gamma", allow_zero=True)
    if s["grad_clip"] is not None:
        s["grad_clip"] = check_positive(s["grad_clip"], "grad_clip")
    if s["ema"] is not None:
        s["ema"] = check_positive(s["ema"], "ema", allow_zero=True)
        if s["ema"] >= 1:
            raise ValueError(f"ema must be a decay rate in [0, 1) or None, got {s['ema']!r}")
    if s["patience"] is not None:
        s["patience"] = check_int(s["patience"], "patience", 1)
    if s["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {s['loss']!r}")
    for k in ("shuffle", "drop_last", "restrict_M"):
        if not isinstance(s[k], (bool, np.bool_)):
            raise TypeError(f"{k} must be a bool, got {s[k]!r}")
        s[k] = bool(s[k])
    if s["M"] == "auto":
        s["M"] = float(pfgm_M(norm, d, s["sigma"], s["tau"]))
    s["M"] = check_positive(s["M"], "M")
    flow = FLOWS[preset]
    if s["z_max"] == "auto":
        s["z_max"] = pfgm_z_max(s["M"], s["sigma"], s["tau"])
    elif s["z_max"] == "radial" and "delta" in flow:
        # nominal end height of a point starting at the origin: |y~|^2 / 2 = steps * delta
        s["z_max"] = math.sqrt(2.0 * flow["steps"] * flow["delta"])
    if s["z_min"] == "sigma":
        s["z_min"] = s["sigma"]
    s["z_max"] = check_positive(s["z_max"], "z_max")
    s["z_min"] = check_positive(s["z_min"], "z_min", allow_zero=True)
    if not s["z_min"] < s["z_max"]:
        raise ValueError(f"z_min ({s['z_min']:.4g}) must be < z_max ({s['z_max']:.4g})")
    return s
