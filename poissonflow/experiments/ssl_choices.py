"""The self-supervised study's pieces that come before its runs: each objective x seed's
training settings and objective, and the choices made on seed 0's validation split (the Riesz
exponent s from cfg.s_grid, then the uniformity weights of WEIGHTED from cfg.weight_grid), each
by the tuned linear probe's accuracy on the validation images, the test set not looked at
(ssl_experiment.py's module docstring)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import ssl as _ssl
from .augment import augmentation_for
from .rows import representation_metrics

__all__ = ["WEIGHTED", "validate_s", "validate_weights"]

# The objectives whose uniformity weight is chosen on the validation split (align_riesz at the
# chosen s).
WEIGHTED = ("align_uniform", "align_riesz")


def _settings(cfg, seed: int) -> _ssl.SSLSettings:
    return _ssl.SSLSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        arch="digits" if cfg.dataset == "digits" else "blog",
    )


def _objective(cfg, name: str, s: float | None, weight=None):
    """The objective `name`; weight: its uniformity term's weight (None: riesz_weight for
    align_riesz, the objective's default otherwise)."""
    if name == "align_riesz":
        return _ssl.make_objective(
            name,
            s=float(s),
            bank_size=cfg.bank_size,
            uniform_weight=float(cfg.riesz_weight if weight is None else weight),
        )
    if weight is not None:
        return _ssl.make_objective(name, uniform_weight=float(weight))
    return _ssl.make_objective(name)


def _fingerprint(*arrays) -> str:
    from .cache import arrays_sha256

    return arrays_sha256({f"a{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)})


def _validation_point(cfg, dataset, cache):
    """point(objective, label): an encoder trained (seed 0) on seed 0's fit images, scored on
    its validation images (protocol.py): tuned-probe accuracy with C chosen there, k-NN 20."""
    from .probes import knn_predict, linear_probe
    from .protocol import validation_split

    fit_i, val_i = validation_split(dataset.y_train, 0)
    xf, xv = dataset.x_train[fit_i], dataset.x_train[val_i]
    yf, yv = dataset.y_train[fit_i], dataset.y_train[val_i]
    fp = _fingerprint(xf, xv)
    aug = augmentation_for(dataset.name)

    def point(objective, label):
        t0 = time.perf_counter()
        enc = _ssl.encode_ssl(
            xf,
            xv,
            fp,
            objective,
            aug,
            _settings(cfg, 0),
            device=cfg.device,
            cache_dir=cache,
            progress=cfg.progress,
        )
        tuned = linear_probe(
            enc.features_train, yf, enc.features_test, yv, val_x=enc.features_test, val_y=yv
        )
        knn = knn_predict(enc.features_train, yf, enc.features_test, k=20)
        m = representation_metrics(enc.features_test, enc.views_test)
        p = {
            "val_tuned": tuned.val_accuracy,
            "val_knn20": float((knn == yv).mean()),
            **m,
            "train_seconds": enc.train_seconds,
            "from_cache": enc.from_cache,
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"  validation: {label} val tuned {tuned.val_accuracy:.3f} knn20 "
            f"{p['val_knn20']:.3f} ({p['seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return p

    return point, len(fit_i), len(val_i)


def validate_weights(cfg, dataset, cache: Path, s) -> dict[str, Any]:
    """The uniformity weight of each objective of WEIGHTED that runs, chosen from
    cfg.weight_grid on the validation split (align_riesz at the chosen s); ties: the smaller
    weight. {objective: {"points": [...], "chosen": weight}}."""
    point, n_fit, n_val = _validation_point(cfg, dataset, cache)
    out = {}
    for name in WEIGHTED:
        if name not in cfg.objectives or not cfg.weight_grid:
            continue
        pts = [
            {"weight": float(w), **point(_objective(cfg, name, s, w), f"{name} w={w:g}")}
            for w in cfg.weight_grid
        ]
        best = max(p["val_tuned"] for p in pts)
        out[name] = {
            "points": pts,
            "chosen": min(p["weight"] for p in pts if p["val_tuned"] == best),
            "n_fit": n_fit,
            "n_val": n_val,
            "seed": 0,
            "criterion": "tuned linear probe accuracy on the validation split (C "
            "chosen there; ties: the smaller weight)",
        }
    return out


def validate_s(cfg, dataset, cache: Path) -> dict[str, Any]:
    """The s curve on seed 0's validation split (protocol.py; module docstring)."""
    from .protocol import validation_split

    point, _, _ = _validation_point(cfg, dataset, cache)
    fit_i, val_i = validation_split(dataset.y_train, 0)
    return _s_curve(cfg, point, fit_i, val_i)


def _s_curve(cfg, point, fit_i, val_i):
    points = [
        {"s": float(s), **point(_objective(cfg, "align_riesz", s), f"s={s:g}")} for s in cfg.s_grid
    ]
    best = max(p["val_tuned"] for p in points)
    chosen = min(p["s"] for p in points if p["val_tuned"] == best)
    return {
        "n_fit": int(len(fit_i)),
        "n_val": int(len(val_i)),
        "seed": 0,
        "points": points,
        "chosen_s": chosen,
        "criterion": "tuned linear probe accuracy on the validation "
        "split, C chosen there (ties: the smaller s)",
        # Wang & Isola's objective on the same split, same seed: the bar to meet
        "reference_align_uniform": point(_objective(cfg, "align_uniform", None), "align_uniform"),
    }
