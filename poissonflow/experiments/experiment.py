"""The end-to-end experiment: does Poisson-flow uniformity improve downstream accuracy?

    python -m poissonflow experiment                       # digits, 5 seeds, a few minutes
    python -m poissonflow experiment --dataset cifar10-subset --seeds 0 1 2
    python -m poissonflow experiment --dataset cifar10 --data-dir ~/data/cifar-10-batches-py

Per seed: train the encoder (the blog's SmallAlexNet through a linear head; features cached on
disk), then evaluate every row of the table below on the same features, and sweep the horizon
of the flow. Each row declares the values it needs (the graph below), so any row can be computed
alone; the learned fields are cached on disk like the features, keyed by their settings and the
training features. Rows (docs/DESIGN.md, "The learned field" and "Metrics and probes"):

  encoder head          the head's own accuracy (what the blog reports as "AlexNet")
  raw features          the baseline the blog never ran
  L2 (centred)          centre with the train mean, then L2-normalise (the encoder's features
                        are already unit vectors, so plain L2 would change nothing)
  ZCA whitening         fitted on train
  flow: blog preset     learned field, the blog's code (radial Euler 100 x 0.01 from z = 0),
                        the 129-d end points as the blog fed them to LogisticRegression()
  flow: untrained blog field  the blog preset's network at its initialisation, same ODE: the
                        blog's published code never reaches its optimiser step (docs/DESIGN.md 4)
  flow: blog preset, to plateau  the blog field trained until its validation loss plateaus
                        (PLATEAU below), same ODE
  scale control         raw features times the blog-flowed features' mean norm: the default
                        LogisticRegression (C = 1) is regularised according to feature norm
  flow: blog, unit norm the blog-flowed features scaled back to unit norm
  flow: PFGM preset     learned field, PFGM's defaults and log-z RK4, on the sphere
  flow: PFGM preset, to plateau  (only with --pfgm-plateau, OPTIONAL_ROWS) the PFGM field
                        (weights averaged, EMA 0.9999) trained until its validation loss
                        plateaus (PLATEAU), same ODE
  flow: exact field     the empirical field of the train features (plane start, automatic
                        horizon, leave-one-out), on the sphere

Each row is scored by the blog's classifier (scikit-learn's default LogisticRegression() on
unscaled features), by the tuned linear probe (StandardScaler, lbfgs, C chosen on a
validation split of train, test scored once), by cosine k-NN (k = 20 and 200) and by linear
probes that see 1% and 10% of the training labels (probes.low_label_probe). Every probe's
per-image test predictions are kept (predictions.npz) and every row is compared with the raw
features image by image: the paired difference, its bootstrap 95% interval and an exact
McNemar test, per seed and pooled over seeds (probes.paired_comparison).

Resuming: each finished seed's results are stored in the cache folder (seed_result_key), and
results.json / results.md are rewritten after every seed, marked partial until the last; the
same command run again reads the finished seeds back and continues with the next one (a seed
stopped half-way reuses its cached encoder features and learned fields). --no-resume
recomputes finished seeds. --feature-dim d trains the encoder with a d-wide fc8 (the
L2-normalised features; default the blog's 128), every row then runs on d-dimensional
features.

--faithful runs the blog's code where it differs from the default reproduction: the encoder's
N(0, 0.02) initialisation, raw [0, 1] pixels in a fixed order, and the "blog-faithful" field
(mean loss over the d + 1 outputs, fixed unshuffled batches); docs/BLOG_FAITHFULNESS.md lists
every difference that remains. Representation metrics are computed on the test
features after L2 normalisation (Wang & Isola's alignment on two augmented views of each test
image, their uniformity with t = 2, Fang et al.'s Wasserstein uniformity, effective rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import metrics
from .encoder import MAX_FEATURE_DIM, MIN_FEATURE_DIM
from .probes import knn_predict, knn_tuned, labels_per_class_probe, linear_probe
from .protocol import VAL_FRACTION

__all__ = ["ExperimentConfig", "ConfigError", "validate_config", "run_experiment", "main",
           "ROWS", "OPTIONAL_ROWS", "row_names", "NODES", "Graph", "Node", "Features", "RowOutput", "RunSettings",
           "row_graph", "evaluate_rows", "check_readable", "check_writable_folder"]


# Five seeds: a run of all five took 149-237 s on the 2-core development machine with one
# thread (while other jobs held a load of 6-9), well under 10 minutes.
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclasses.dataclass
class ExperimentConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    out_dir: str = "results/digits"
    cache_dir: str | None = None  # default: <out_dir>/cache
    device: str = "cpu"
    encoder_epochs: int | None = None  # None: the dataset's default (digits 20, CIFAR-10 20)
    field_epochs: int | None = None  # None: each preset's default
    sweep: bool = True
    limit: int | None = None  # only the first `limit` (>= MIN_LIMIT) train, limit // 3 test
    progress: bool | None = None  # None: progress bars when stderr is a terminal
    faithful: bool = False  # the blog's code where it differs (module doc)
    threads: int | None = 1  # torch, BLAS and OpenMP threads for the run (None: leave as is)
    feature_dim: int | None = None  # the encoder's fc8 width (None: 128, the blog's)
    resume: bool = True  # reuse the results of seeds this configuration already finished
    pfgm_plateau: bool = False  # also the row "flow: PFGM preset, to plateau" (OPTIONAL_ROWS)


# --------------------------------------------------------------------------- the row graph
# Every row, and every value rows share (a trained field, the blog flow), is a `Node` that
# declares by name what it needs; `Graph` computes a node's needs first, each value once per
# seed. A row can therefore run alone (the "scale control" row trains and runs the blog flow it
# scales by), the order of ROWS is only the table's order, and no row reads state that another
# row happened to leave behind.
#
# Inputs of the graph: "features" (a Features of the encoder), "labels" ((y_train, y_test)),
# "run" (a RunSettings). A node's make takes the values of its needs, in order; a row's returns
# a RowOutput, fitted on train only.


@dataclasses.dataclass(frozen=True)
class Features:
    """Train features (the images the encoder and the fields train on), test features, the
    test set's augmented views (positive pairs) and the held-out validation split's features
    (protocol.py), on which every choice is made."""

    train: np.ndarray
    test: np.ndarray
    views: tuple[np.ndarray, ...]
    val: np.ndarray | None = None

    def map(self, f: Callable[[np.ndarray], np.ndarray]) -> Features:
        return Features(f(self.train), f(self.test), tuple(f(v) for v in self.views),
                        None if self.val is None else f(self.val))


@dataclasses.dataclass(frozen=True)
class RowOutput:
    features: Features
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the nodes of one seed read besides the data."""

    seed: int
    device: str = "cpu"
    progress: bool = False
    field_epochs: int | None = None
    cache_dir: Path | None = None  # learned fields are cached there (None: always train)
    blog_preset: str = "blog"  # the LearnedField preset of the blog rows ("blog-faithful")


@dataclasses.dataclass(frozen=True)
class FittedField:
    field: Any  # a fitted poissonflow.LearnedField
    train_seconds: float  # of the training run (the original one when from_cache)
    from_cache: bool


@dataclasses.dataclass(frozen=True)
class Node:
    """make(*values of needs, in order) computes the node's value."""

    needs: tuple[str, ...]
    make: Callable[..., Any]


class Graph:
    """Values by name, computed on first request from `nodes` (after their needs) or given
    as `inputs`. `computed` lists the nodes computed so far, in order."""

    def __init__(self, inputs: dict[str, Any], nodes: dict[str, Node]):
        clash = set(inputs) & set(nodes)
        if clash:
            raise ValueError(f"names both given and computed: {sorted(clash)}")
        unknown = {n for node in nodes.values() for n in node.needs} - set(inputs) - set(nodes)
        if unknown:
            raise ValueError(f"nodes need values nothing provides: {sorted(unknown)}")
        self._values = dict(inputs)
        self._nodes = nodes
        self._active: list[str] = []
        self.computed: list[str] = []

    def get(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        if name not in self._nodes:
            raise KeyError(f"no node or input named {name!r}")
        if name in self._active:
            raise RuntimeError(f"dependency cycle: {' -> '.join(self._active + [name])}")
        self._active.append(name)
        try:
            node = self._nodes[name]
            value = node.make(*[self.get(n) for n in node.needs])
        finally:
            self._active.pop()
        self._values[name] = value
        self.computed.append(name)
        return value


def _identity(features):
    return RowOutput(features, {})


def _l2_centred(features):
    mean = features.train.mean(0, keepdims=True)

    def f(a):
        c = a - mean
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    return RowOutput(features.map(f), {})


def _zca(features, eps=1e-5):
    """ZCA whitening W = U diag(1 / sqrt(lambda + eps * mean lambda)) U^T, fitted on train."""
    x = features.train.astype(np.float64)
    mean = x.mean(0, keepdims=True)
    cov = np.cov(x - mean, rowvar=False, bias=True)
    lam, U = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    W = (U / np.sqrt(lam + eps * lam.mean())) @ U.T
    return RowOutput(features.map(lambda a: (a - mean) @ W), {})


# Part of a learned field's cache key: bump it whenever a change in learned.py or pfgm.py
# changes what training produces for the same settings (the package version alone does not
# change between development commits).
# 2: loss, batch and plateau settings (the faithful blog options); the validation history is saved
# 3: trained on the fit images only (the study's validation split held out); nothing earlier reused
LEARNED_FIELD_CACHE_VERSION = 3


# LearnedField parameters that only change what is displayed, not the trained field.
_DISPLAY_ONLY = ("progress",)


def learned_field_key(params: dict[str, Any], train_features: np.ndarray) -> str:
    """Cache key of a learned field: its constructor settings (get_params(), less the display
    options), the versions that determine the trained weights and the file layout, and a
    fingerprint of the training features."""
    from .. import __version__
    from ..learned import FILE_FORMAT
    from .cache import arrays_sha256, cache_key

    settings = {k: v for k, v in params.items() if k not in _DISPLAY_ONLY}
    return cache_key(
        {"what": "learned-field", "cache_version": LEARNED_FIELD_CACHE_VERSION,
         "file_format": FILE_FORMAT, "poissonflow": __version__, "torch": torch.__version__,
         "params": settings},
        arrays_sha256({"features_train": np.ascontiguousarray(train_features)}),
    )


# The plateau rule of the "to plateau" row (LearnedField's patience / eval_every): validation
# every 100 epochs, stop after 5 evaluations without a 0.1% improvement, at most 20000 epochs.
# Measured on digits (seed 0, one update an epoch): the blog field's validation loss fell from
# 14.8 to 5.75 and the rule stopped at epoch 8600 (17 s on one thread); at the default 200
# epochs it is 14.5. The PFGM preset (seed 0): from 6.66 at epoch 100 to 0.997, stopped at
# epoch 13400 (102 s on one thread at a load of 3-5; W2 of the test features 1.201 raw, 1.231
# after its 200-epoch flow, 1.025 after this one).
PLATEAU = {"epochs": 20000, "patience": 5, "eval_every": 100}


def _fit_field(preset: str, train: bool = True, plateau: bool = False):
    """Node: the learned field of `preset` ("blog": the run's blog_preset), trained on the
    train features, or loaded from the cache when the same settings were trained on the same
    features before. train=False: the network at its seeded initialisation (not cached: it
    costs nothing), the blog's published code's field."""

    def make(features, run):
        from ..learned import LearnedField
        from .cache import ArrayCache

        name = run.blog_preset if preset == "blog" else preset
        kwargs = {"preset": name, "seed": run.seed, "device": run.device}
        if plateau:
            kwargs.update(PLATEAU)
        if run.field_epochs is not None:  # with the plateau rule: the most epochs
            kwargs["epochs"] = run.field_epochs
        field = LearnedField(**kwargs)
        if not train:
            return FittedField(field.fit(features.train, progress=False, train=False), 0.0,
                               False)
        field_seconds = [0.0]  # set by fit(): the training time stored with a cached field

        def fit():
            t0 = time.perf_counter()
            field.fit(features.train, progress=run.progress)
            field_seconds[0] = time.perf_counter() - t0
            return field

        if run.cache_dir is None:
            return FittedField(fit(), field_seconds[0], False)
        d = features.train.shape[1]
        fitted, meta, hit = ArrayCache(run.cache_dir).get_or_compute_object(
            learned_field_key(field.get_params(), features.train), fit,
            save=lambda f, path: f.save(path),
            load=lambda path: LearnedField.load(path, n_features=d, device=run.device),
            meta=lambda f: {"train_seconds": field_seconds[0]},
        )
        return FittedField(fitted, float(meta["train_seconds"]), hit)

    return Node(("features", "run"), make)


def _learned_flow(field_node: str, output: str):
    """Row: the features flowed through a learned field (its preset's own ODE); info: the
    guard's counts (point-evaluations guarded, points guarded at least once, points left on
    the plane z = 0), the largest flowed norm over the median (train and test), and the
    field's training iterations, final and per-epoch loss."""

    def make(features, fitted):
        from ..transform import transform

        counts = {"guard_fired": 0, "guarded_points": 0, "on_plane": 0, "points": 0}

        def flow(a):
            out, info = transform(a, field=fitted.field, output=output, return_info=True)
            counts["guard_fired"] += int(info.get("guard_fired", 0))
            counts["guarded_points"] += int(info.get("guarded_points", 0))
            counts["on_plane"] += int(info.get("on_plane", 0))
            counts["points"] += len(a)
            return out

        flowed = features.map(flow)
        field = fitted.field
        n = max(1, counts["points"])
        # far points: the blog's radial update adds d^2 |f|^2 / (f.y)^2 to |y|^2 where the
        # field is nearly orthogonal to y; a few such points change how a scaler sees the row
        norms = np.linalg.norm(np.concatenate([flowed.train, flowed.test]), axis=1)
        return RowOutput(flowed, {
            "field_train_seconds": fitted.train_seconds, "field_from_cache": fitted.from_cache,
            "field_preset": field.preset, **counts,
            # over the train, test and view sets flowed (docs/DESIGN.md, "The flow")
            "guarded_fraction": counts["guarded_points"] / n,
            "on_plane_fraction": counts["on_plane"] / n,
            "norm_max_over_median": float(norms.max() / max(np.median(norms), 1e-300)),
            "field_iterations": int(field.n_iterations_),
            "field_final_loss": field.loss_history_[-1] if field.loss_history_ else None,
            "field_loss_history": [float(v) for v in field.loss_history_],
            "field_val_loss_history": [list(v) for v in getattr(field, "val_loss_history_", [])],
            "field_plateau_epoch": getattr(field, "plateau_epoch_", None),
        })

    return Node(("features", field_node), make)


def _scale_control(features, blog):
    """Raw features times the blog-flowed train features' mean norm (same classifier)."""
    s = float(np.linalg.norm(blog.features.train, axis=1).mean())
    return RowOutput(features.map(lambda a: a * s), {"scale": s})


def _unit_norm(flowed):
    """Control: a flowed row's features scaled back to unit norm (only the directions the flow
    gave them; the norm, which a fixed-C classifier reads as a regularisation strength, gone)."""
    return RowOutput(flowed.features.map(
        lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)), {})


# Far points: the blog's radial update can throw a point to hundreds of times the median norm
# (docs/DESIGN.md, "Metrics and probes"). The control pulls every point beyond CLIP_FACTOR
# times the training features' median norm back to that radius (direction kept).
CLIP_FACTOR = 3.0


def _clipped(flowed):
    """Control: a flowed row with its far points radially clipped at CLIP_FACTOR x the median
    norm of its training features; info: the radius and the share of points clipped."""
    radius = CLIP_FACTOR * float(np.median(np.linalg.norm(flowed.features.train, axis=1)))
    counts = {"clipped": 0, "points": 0}

    def clip(a):
        n = np.linalg.norm(a, axis=1, keepdims=True)
        far = n[:, 0] > radius
        counts["clipped"] += int(far.sum())
        counts["points"] += len(a)
        return np.where(n > radius, a * (radius / np.maximum(n, 1e-300)), a)

    out = flowed.features.map(clip)
    return RowOutput(out, {"clip_radius": radius, **counts,
                           "clipped_fraction": counts["clipped"] / max(1, counts["points"])})


def _exact_flow(features):
    from ..transform import transform

    infos = []

    def flow(a):
        out, info = transform(a, charges=features.train, return_info=True, progress=False)
        infos.append(info)
        return out

    flowed = features.map(flow)
    i = infos[0]  # the train features' flow
    return RowOutput(flowed, {"z_min": i["z_min"], "z_max": i["z_max"], "steps": i["steps"],
                              "train_excluded": i["excluded"]})


BLOG_ROW = "flow: blog preset"
UNTRAINED_ROW = "flow: untrained blog field"
PLATEAU_ROW = "flow: blog preset, to plateau"
PFGM_PLATEAU_ROW = "flow: PFGM preset, to plateau"
RAW_ROW = "raw features"

# The table's rows, in table order.
ROWS: list[tuple[str, Node]] = [
    (RAW_ROW, Node(("features",), _identity)),
    ("L2 (centred)", Node(("features",), _l2_centred)),
    ("ZCA whitening", Node(("features",), _zca)),
    (BLOG_ROW, _learned_flow("field: blog", "raw")),
    (UNTRAINED_ROW, _learned_flow("field: blog, untrained", "raw")),
    (PLATEAU_ROW, _learned_flow("field: blog, plateau", "raw")),
    ("scale control", Node(("features", BLOG_ROW), _scale_control)),
    # the controls of every learned flow whose output is not on the sphere (the PFGM rows
    # flow onto the unit sphere: their own unit-norm control is themselves)
    ("flow: blog, unit norm", Node((BLOG_ROW,), _unit_norm)),
    ("flow: untrained blog field, unit norm", Node((UNTRAINED_ROW,), _unit_norm)),
    ("flow: blog preset, to plateau, unit norm", Node((PLATEAU_ROW,), _unit_norm)),
    ("flow: blog, far points clipped", Node((BLOG_ROW,), _clipped)),
    ("flow: untrained blog field, far points clipped", Node((UNTRAINED_ROW,), _clipped)),
    ("flow: blog preset, to plateau, far points clipped", Node((PLATEAU_ROW,), _clipped)),
    ("flow: PFGM preset", _learned_flow("field: pfgm", "sphere")),
    ("flow: exact field", Node(("features",), _exact_flow)),
]

# Rows computed only when asked for (ExperimentConfig.pfgm_plateau, --pfgm-plateau), each
# placed in the table after the row named second. The PFGM field trained to its plateau costs
# about 100 s of CPU a seed on digits (13400-19900 epochs): with it the default five seeds
# took 155 s of CPU for seed 0 instead of about 45 s, over the 10 minutes the default run
# must stay under.
OPTIONAL_ROWS: list[tuple[str, str, Node]] = [
    (PFGM_PLATEAU_ROW, "flow: PFGM preset", _learned_flow("field: pfgm, plateau", "sphere")),
]


def row_names(pfgm_plateau: bool = False) -> list[str]:
    """The rows of a run, in table order: ROWS, and the optional rows asked for."""
    names = [name for name, _ in ROWS]
    for name, after, _ in OPTIONAL_ROWS:
        if name == PFGM_PLATEAU_ROW and pfgm_plateau:
            names.insert(names.index(after) + 1, name)
    return names


# --------------------------------------------------------------------------- scoring


def representation_metrics(fte, views) -> dict[str, float]:
    """Alignment (views), uniformity, Wasserstein uniformity and effective rank of the test
    features, all on L2-normalised rows so that rows of different norms compare."""
    z = torch.from_numpy(np.ascontiguousarray(fte, dtype=np.float64))
    z = z / z.norm(dim=1, keepdim=True)
    out = {
        "uniform_loss": float(metrics.uniform_loss(z, t=2.0)),
        "wasserstein_uniformity": float(metrics.wasserstein_uniformity(z)),
        "effective_rank": metrics.effective_rank(z),
    }
    if len(views) == 2:
        a, b = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for v in views)
        out["alignment"] = float(metrics.align_loss(a / a.norm(dim=1, keepdim=True),
                                                    b / b.norm(dim=1, keepdim=True)))
    return out


KNN_FIXED = 20  # the fixed-k column (capped at the smallest training class)
LABELS_PER_CLASS = (1, 10)


def score_row(ftr, ytr, fte, yte, views, seed, fva, yva) -> dict[str, Any]:
    """Every probe of a row and its representation metrics; every choice (C, k) is made on
    the validation features `fva` (images no model trained on), the test set scored once.
    The per-image test predictions of each probe are under "_predictions" (run_seed moves
    them to predictions.npz)."""
    blog = linear_probe(ftr, ytr, fte, yte, blog=True)
    conv = linear_probe(ftr, ytr, fte, yte, blog=True, converged=True)
    tuned = linear_probe(ftr, ytr, fte, yte, val_x=fva, val_y=yva)
    preds = {"blog": blog.test_predictions, "tuned": tuned.test_predictions,
             "blog_converged": conv.test_predictions}
    row: dict[str, Any] = {
        "blog": {"train": blog.train_accuracy, "test": blog.test_accuracy,
                 "n_iter": blog.n_iter, "convergence_warnings": len(blog.convergence_warnings)},
        "tuned": {"train": tuned.train_accuracy, "val": tuned.val_accuracy,
                  "test": tuned.test_accuracy, "C": tuned.C,
                  "val_accuracies": {f"{c:g}": v for c, v in tuned.val_accuracies.items()},
                  "convergence_warnings": len(tuned.convergence_warnings)},
        "blog_converged": {"train": conv.train_accuracy, "test": conv.test_accuracy,
                           "C": 1.0, "n_iter": conv.n_iter,
                           "convergence_warnings": len(conv.convergence_warnings)},
    }
    smallest = int(np.unique(ytr, return_counts=True)[1].min())
    pred = knn_predict(ftr, ytr, fte, k=min(KNN_FIXED, smallest))
    preds["knn20"] = pred
    row["knn20"] = {"test": float((pred == yte).mean()), "k": min(KNN_FIXED, smallest)}
    pred, k, val_acc = knn_tuned(ftr, ytr, fva, yva, fte)
    preds["knn"] = pred
    row["knn"] = {"test": float((pred == yte).mean()), "k": k, "val": val_acc[k],
                  "val_accuracies": {str(kk): v for kk, v in val_acc.items()},
                  "k_cap": smallest}
    for per_class in LABELS_PER_CLASS:
        low = labels_per_class_probe(ftr, ytr, fte, yte, fva, yva, per_class=per_class,
                                     seed=seed)
        name = f"labels{per_class}perclass"
        preds[name] = low.test_predictions
        row[name] = {"train": low.train_accuracy, "val": low.val_accuracy,
                     "test": low.test_accuracy, "C": low.C, "n_labels": low.n_train_used,
                     "convergence_warnings": len(low.convergence_warnings)}
    row["convergence_warnings"] = sum(v["convergence_warnings"] for v in row.values()
                                      if isinstance(v, dict) and "convergence_warnings" in v)
    row["metrics"] = representation_metrics(fte, views)
    row["dim"] = int(ftr.shape[1])
    row["mean_norm"] = float(np.linalg.norm(fte, axis=1).mean())
    row["_predictions"] = preds
    return row


# --------------------------------------------------------------------------- horizon sweep


def horizon_sweep(features: Features, labels, run: RunSettings,
                  blog: FittedField) -> list[dict[str, Any]]:
    """Accuracy and uniformity along the flow: the blog preset after k of its 100 steps, and
    the exact field stopped at growing z_max. Each point: tuned-probe test accuracy, W2,
    uniform_loss."""
    from ..horizon import auto_z_max, auto_z_min
    from ..transform import transform

    ftr, fte, fva = features.train, features.test, features.val
    ytr, yte, yva = labels
    points = []
    field = blog.field
    total = field.default_flow().get("steps", 100)
    for k in sorted({0, total // 20, total // 10, total // 5, 2 * total // 5,
                     3 * total // 5, 4 * total // 5, total}):
        if k == 0:
            gtr, gva, gte = (np.hstack([a, np.zeros((len(a), 1))]) for a in (ftr, fva, fte))
        else:
            gtr, gva, gte = (transform(a, field=field, steps=k, output="raw")
                             for a in (ftr, fva, fte))
        points.append(_sweep_point("blog preset", "steps", k, k / total, gtr, ytr, gte, yte,
                                   gva, yva))
    charges = torch.from_numpy(np.ascontiguousarray(ftr, dtype=np.float64))
    zmin, zmax = auto_z_min(charges), auto_z_max(charges)
    for zend in np.geomspace(2 * zmin, zmax, 7):
        gtr, gva, gte = (transform(a, charges=ftr, z_max=float(zend)) for a in (ftr, fva, fte))
        frac = float(np.log(zend / zmin) / np.log(zmax / zmin))
        points.append(_sweep_point("exact field", "z_max", float(zend), frac, gtr, ytr, gte, yte,
                                   gva, yva))
    return points


def _sweep_point(curve, knob, value, fraction, gtr, ytr, gte, yte, gva, yva):
    """One point of a sweep; `fraction` is how far along the flow it is (blog: steps / 100,
    exact field: log(z_end / z_min) / log(z_max / z_min)). val_accuracy is what a horizon
    would be chosen by; test_accuracy is reported, never chosen on."""
    tuned = linear_probe(gtr, ytr, gte, yte, val_x=gva, val_y=yva)
    m = representation_metrics(gte, ())
    return {"curve": curve, "knob": knob, "value": value, "fraction": fraction,
            "val_accuracy": tuned.val_accuracy, "test_accuracy": tuned.test_accuracy,
            "wasserstein_uniformity": m["wasserstein_uniformity"],
            "uniform_loss": m["uniform_loss"]}


SWEEP = "horizon sweep"

# Every node: the rows, the fields they share and the sweep.
NODES: dict[str, Node] = {
    **dict(ROWS),
    **{name: node for name, _, node in OPTIONAL_ROWS},
    "field: blog": _fit_field("blog"),
    "field: blog, untrained": _fit_field("blog", train=False),
    "field: blog, plateau": _fit_field("blog", plateau=True),
    "field: pfgm": _fit_field("pfgm"),
    "field: pfgm, plateau": _fit_field("pfgm", plateau=True),
    SWEEP: Node(("features", "labels", "run", "field: blog"), horizon_sweep),
}


def row_graph(features: Features, labels, run: RunSettings) -> Graph:
    """The graph of one seed's rows over these features."""
    return Graph({"features": features, "labels": labels, "run": run}, NODES)


def evaluate_rows(graph: Graph, names=None) -> dict[str, Any]:
    """Computes and scores the named rows (default: every row, in table order); each row's
    needs are computed on the way, once. Returns {name: scored row}; a row's "seconds" include
    the needs computed first for it."""
    names = [name for name, _ in ROWS] if names is None else list(names)
    known = row_names(pfgm_plateau=True)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows are {known}")
    ytr, yte, yva = graph.get("labels")
    run = graph.get("run")
    out = {}
    for name in names:
        t = time.perf_counter()
        made = graph.get(name)
        g = made.features
        row = score_row(g.train, ytr, g.test, yte, g.views, run.seed, g.val, yva)
        row["info"] = made.info
        row["seconds"] = time.perf_counter() - t
        out[name] = row
        print(f"  seed {run.seed}: {name:24s} tuned test {row['tuned']['test']:.3f} "
              f"({row['seconds']:.1f} s)", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- the run


def run_seed(dataset, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """One seed: encoder, every row, the sweep. Returns the seed's results, with the per-image
    test predictions under "predictions" ({row: {probe: labels}}, the head's under "encoder
    head") and the test labels under "y_test"; run_experiment moves both to predictions.npz."""
    from .encoder import encode_dataset
    from .protocol import split_record, validation_split

    settings = encoder_settings(cfg, dataset.name, seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    # the validation split is cut before anything trains: the encoder, the fields and the
    # probes' fits see only the fit images (protocol.py)
    fit_idx, val_idx = validation_split(dataset.y_train, seed)
    fit = dataclasses.replace(dataset, x_train=dataset.x_train[fit_idx],
                              y_train=dataset.y_train[fit_idx])
    enc = encode_dataset(fit, settings, device=cfg.device, cache_dir=_cache_dir(cfg),
                         progress=cfg.progress, x_val=dataset.x_train[val_idx])
    seconds = {"encoder": time.perf_counter() - t0}
    ytr, yte, yva = fit.y_train, dataset.y_test, dataset.y_train[val_idx]
    features = Features(enc.features_train, enc.features_test, tuple(enc.views_test),
                        enc.features_val)
    rows: dict[str, Any] = {
        "encoder head": {
            "head": {"train": enc.train_acc, "train_augmented": enc.train_acc_augmented,
                     "train_last_epoch": enc.history.epoch_acc[-1], "test": enc.test_acc},
            "metrics": representation_metrics(features.test, features.views),
            "dim": int(features.train.shape[1]), "encoder_from_cache": enc.from_cache,
            "encoder_settings": settings.to_dict(),
        }
    }
    run = RunSettings(seed=seed, device=cfg.device, progress=bool(cfg.progress),
                      field_epochs=cfg.field_epochs, cache_dir=_cache_dir(cfg),
                      blog_preset="blog-faithful" if cfg.faithful else "blog")
    graph = row_graph(features, (ytr, yte, yva), run)
    rows.update(evaluate_rows(graph, row_names(cfg.pfgm_plateau)))
    predictions = {"encoder head": {"head": enc.logits_test.argmax(1)}}
    for name, row in rows.items():
        if "_predictions" in row:
            predictions[name] = row.pop("_predictions")
    out = {"seed": seed, "rows": rows, "seconds": seconds, "predictions": predictions,
           "y_test": np.asarray(yte), "validation": split_record(fit_idx, val_idx)}
    if cfg.sweep:
        t = time.perf_counter()
        out["sweep"] = graph.get(SWEEP)
        seconds["sweep"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    # the process's CPU time for the seed: with one thread, what the seed takes on an idle
    # core, whatever else the machine was running (wall times above include the waiting)
    seconds["cpu_total"] = time.process_time() - cpu0
    return out


def encoder_settings(cfg: ExperimentConfig, dataset_name: str, seed: int):
    """The EncoderSettings of one seed of the run (its cache key includes every field)."""
    from .encoder import default_settings

    settings = default_settings(dataset_name, faithful=cfg.faithful,
                                feature_dim=cfg.feature_dim).replace(seed=seed)
    if cfg.encoder_epochs is not None:
        settings = settings.replace(epochs=cfg.encoder_epochs)
    return settings


def _cache_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"


# ------------------------------------------------------------------ finished seeds, resumed
# A finished seed's results (rows, sweep, timings, per-image predictions) are stored in the
# cache folder under a key of everything that determines them, so a run that is stopped (or
# a longer list of seeds) resumes at the next unfinished seed. Within a seed the encoder's
# features and the learned fields are cached on their own (encode_dataset, _fit_field): a
# seed stopped half-way recomputes only its rows. Bump SEED_RESULT_VERSION whenever a change
# here, in probes.py, metrics.py, transform.py or flow.py changes what a seed's rows hold.
# 2: the probes scale with one StandardScaler fit on all training features (probes.py).
# 3: the held-out validation split (protocol.py), converged blog classifier, k-NN k on
# validation, labels-per-class probes, unit-norm and clipped controls.
SEED_RESULT_VERSION = 3


def seed_result_key(cfg: ExperimentConfig, dataset, seed: int) -> str:
    """Cache key of one seed's results: the code versions, the settings that change them and
    a fingerprint of the data (after --limit). Display options (progress, output folders)
    are not part of it."""
    from .. import __version__
    from .cache import cache_key
    from .encoder import ENCODER_VERSION

    return cache_key(
        {"what": "experiment-seed", "seed_result_version": SEED_RESULT_VERSION,
         "encoder_version": ENCODER_VERSION,
         "learned_field_cache_version": LEARNED_FIELD_CACHE_VERSION,
         "poissonflow": __version__, "torch": torch.__version__, "numpy": np.__version__,
         "sklearn": _sklearn_version(), "dataset": dataset.name, "seed": int(seed),
         "encoder_settings": encoder_settings(cfg, dataset.name, seed).to_dict(),
         "field_epochs": cfg.field_epochs, "faithful": cfg.faithful, "sweep": cfg.sweep,
         "device": torch.device(cfg.device).type, "threads": cfg.threads,
         "rows": row_names(cfg.pfgm_plateau), "plateau": PLATEAU,
         "val_fraction": VAL_FRACTION, "clip_factor": CLIP_FACTOR},
        dataset.fingerprint(),
    )


def source_sha256() -> str:
    """sha256 of the package's Python sources (recorded with each seed, not part of its key:
    a resumed run reports when its seeds were computed by different sources)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _store_seed(cache, key: str, done: dict[str, Any], predictions, y_test) -> None:
    from .report import _jsonable

    index, arrays = [], {"y_test": np.asarray(y_test)}
    for row, probes in predictions.items():
        for probe, pred in probes.items():
            name = f"p{len(index)}"
            index.append([row, probe, name])
            arrays[name] = np.asarray(pred)
    record = {"result": _jsonable(done), "predictions": index}
    arrays["record_json"] = np.array(json.dumps(record))
    cache.put(key, arrays, {"what": "experiment-seed", "seed": int(done["seed"])})


def _load_seed(cache, key: str):
    """(seed results, predictions, y_test) of a finished seed, or None."""
    found = cache.get(key)
    if found is None:
        return None
    arrays, _ = found
    try:
        record = json.loads(str(arrays["record_json"][()]))
        predictions: dict[str, dict[str, np.ndarray]] = {}
        for row, probe, name in record["predictions"]:
            predictions.setdefault(row, {})[probe] = arrays[name]
        return record["result"], predictions, arrays["y_test"]
    except (KeyError, ValueError, TypeError):
        return None


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Runs every seed and writes the outputs (after each seed, marked incomplete until the
    last). The problems are small (a 1347 x 129 logistic regression, a 129-wide MLP): with two
    threads on two shared cores the OpenMP and BLAS workers spin against each other, and one
    seed's rows took 17 minutes at a load of 9 where one thread took 30 s for the whole seed
    (measured on the development machine), so the run limits torch, BLAS and OpenMP to `cfg.threads`."""
    validate_config(cfg)
    if cfg.threads is None:
        return _run(cfg)
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with threadpool_limits(limits=cfg.threads):
            return _run(cfg)
    finally:
        torch.set_num_threads(before)


def load_limited(name: str, data_dir, limit):
    """The data set, cut to its first `limit` train and limit / 3 test examples (--limit;
    shared with ssl_experiment)."""
    from .data import load_dataset

    dataset = load_dataset(name, data_dir)
    if limit is not None:
        n_test = max(10, limit // 3)
        dataset = dataclasses.replace(
            dataset, x_train=dataset.x_train[:limit], y_train=dataset.y_train[:limit],
            x_test=dataset.x_test[:n_test], y_test=dataset.y_test[:n_test],
        )
    return dataset


def _run(cfg: ExperimentConfig) -> dict[str, Any]:
    if cfg.progress is None:
        cfg = dataclasses.replace(cfg, progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    dataset = load_limited(cfg.dataset, cfg.data_dir, cfg.limit)
    from .cache import ArrayCache

    cache = ArrayCache(_cache_dir(cfg))
    source = source_sha256()
    per_seed: list[dict[str, Any]] = []
    predictions: dict[int, Any] = {}
    for seed in cfg.seeds:
        key = seed_result_key(cfg, dataset, seed)
        found = _load_seed(cache, key) if cfg.resume else None
        if found is not None:
            done, preds, y_test = found
            done["resumed"] = True
            print(f"{dataset.name}: seed {seed} finished before, its results read from "
                  f"{cache.path(key)}", file=sys.stderr)
        else:
            print(f"{dataset.name}: seed {seed}", file=sys.stderr)
            done = run_seed(dataset, cfg, seed)
            preds, y_test = done.pop("predictions"), done.pop("y_test")
            done["source_sha256"] = source
            _store_seed(cache, key, done, preds, y_test)
            done["resumed"] = False
        predictions[seed] = (preds, y_test)
        per_seed.append(done)
        if seed != cfg.seeds[-1]:
            # the seeds so far, marked partial: a long run that is stopped keeps them
            _write(cfg, dataset, per_seed, predictions, t0, complete=False)
    return _write(cfg, dataset, per_seed, predictions, t0, complete=True)


def _write(cfg, dataset, per_seed, predictions, t0, *, complete: bool) -> dict[str, Any]:
    from .. import __version__
    from . import report
    from .protocol import _compare, run_name

    results = {
        "config": dataclasses.asdict(cfg),
        "dataset": {"name": dataset.name, "n_train": int(len(dataset.y_train)),
                    "n_test": int(len(dataset.y_test)), "source": str(dataset.source),
                    "sha256": dataset.file_sha256},
        "versions": {"poissonflow": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "sklearn": _sklearn_version(), "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "per_seed": per_seed,
        "summary": report.summarise(per_seed),
        "paired": report.paired_statistics(predictions),
        # seed-aware: seeds and test images resampled together, t-test over seeds, corrected
        "seed_aware": _compare(predictions, run_name(cfg.out_dir)),
        "protocol": protocol_record(),
        "seconds": time.perf_counter() - t0,
        # CPU time of the seeds (each when it was computed; one thread: its compute)
        "cpu_seconds": float(sum(s.get("seconds", {}).get("cpu_total", 0.0) for s in per_seed)),
        "complete": complete,  # False: written after a seed, more seeds to come
        "seeds_done": [int(s["seed"]) for s in per_seed],
        "seeds_planned": [int(s) for s in cfg.seeds],
        # the package sources that computed the seeds (more than one: a resumed run whose
        # code changed in between; each seed's own is per_seed[i]["source_sha256"])
        "source_sha256": sorted({s.get("source_sha256") or "unknown" for s in per_seed}),
    }
    report.write_predictions(predictions, Path(cfg.out_dir))
    report.write_outputs(results, Path(cfg.out_dir))
    return results


def protocol_record() -> dict[str, Any]:
    """The protocol's settings, as results.json records them."""
    from .probes import CONVERGED_MAX_ITER, DEFAULT_CS, KNN_GRID

    return {"val_fraction": VAL_FRACTION,
            "validation": "stratified per seed, held out from the encoder, the fields and "
                          "the probes' fits; every choice made on it; test scored once",
            "tuned_Cs": list(DEFAULT_CS), "knn_grid": list(KNN_GRID),
            "knn_fixed": KNN_FIXED, "labels_per_class": list(LABELS_PER_CLASS),
            "blog_converged_max_iter": CONVERGED_MAX_ITER, "clip_factor": CLIP_FACTOR}


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


# --------------------------------------------------------------------------- command line

# The smallest --limit: ten classes must leave the tuned probe's stratified validation split
# (20% of train) at least 2 examples a class and its fitting part at least one, which 50
# balanced examples just reach; 100 (10 a class on average, 33 test images) keeps that true for
# the unequal class counts of the data sets' first rows, and is still a quick run.
MIN_LIMIT = 100


class ConfigError(ValueError):
    """A bad experiment setting, named as its command-line option (`option`), found before
    any work starts. str() reads like argparse's own errors: "argument --limit: ..."."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_readable(path: Path, option: str, what: str) -> None:
    if not path.exists():
        raise ConfigError(option, f"{what} {path} does not exist")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise ConfigError(option, f"{what} {path} is not readable")


def check_writable_folder(path: Path, option: str) -> None:
    """The folder exists and is writable, or can be created (its nearest existing ancestor is
    a writable folder): a run must not fail at its end for want of a place to write."""
    p = path.expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(option, f"{p} exists and is not a folder")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(option, f"cannot write to {p} ({q} is not a writable folder)")


def check_device(device) -> None:
    """The --device option (shared with ssl_experiment): cpu or an available cuda[:index]."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("--device", f"must be 'cpu' or 'cuda[:index]', got {device!r}") \
            from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("--device", f"must be 'cpu' or 'cuda[:index]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device!r} was asked for but CUDA is not available")


def validate_config(cfg: ExperimentConfig) -> None:
    """Raises ConfigError (a ValueError naming the command-line option) for any bad setting;
    cheap, so run_experiment and main call it before loading data or training anything."""
    from .data import DATASETS, find_cifar10_subset

    if cfg.dataset not in DATASETS:
        raise ConfigError("--dataset", f"must be one of {', '.join(DATASETS)}, "
                                       f"got {cfg.dataset!r}")
    seeds = tuple(cfg.seeds) if isinstance(cfg.seeds, (list, tuple)) else None
    if not seeds:
        raise ConfigError("--seeds", f"must be one or more integers, got {cfg.seeds!r}")
    for seed in seeds:
        if not _is_int(seed) or seed < 0:
            raise ConfigError("--seeds", f"seeds must be non-negative integers, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", f"a seed is given twice in {list(seeds)}")
    if cfg.threads is not None and (not _is_int(cfg.threads) or cfg.threads < 1):
        raise ConfigError("--threads", f"must be an integer >= 1, got {cfg.threads!r}")
    if cfg.limit is not None and (not _is_int(cfg.limit) or cfg.limit < MIN_LIMIT):
        raise ConfigError("--limit", f"must be an integer >= {MIN_LIMIT} (enough examples for "
                                     f"the probe's validation split), got {cfg.limit!r}")
    for option, value in (("--encoder-epochs", cfg.encoder_epochs),
                          ("--field-epochs", cfg.field_epochs)):
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(option, f"must be an integer >= 1, got {value!r}")
    if cfg.feature_dim is not None and (not _is_int(cfg.feature_dim) or not
                                        MIN_FEATURE_DIM <= cfg.feature_dim <= MAX_FEATURE_DIM):
        raise ConfigError("--feature-dim", f"must be an integer from {MIN_FEATURE_DIM} to "
                                           f"{MAX_FEATURE_DIM}, got {cfg.feature_dim!r}")
    if not isinstance(cfg.resume, bool):
        raise ConfigError("--no-resume", f"resume must be True or False, got {cfg.resume!r}")
    if not isinstance(cfg.pfgm_plateau, bool):
        raise ConfigError("--pfgm-plateau", f"must be True or False, got {cfg.pfgm_plateau!r}")
    check_device(cfg.device)
    if cfg.data_dir is not None:
        if cfg.dataset == "digits":
            raise ConfigError("--data-dir", "digits are bundled with scikit-learn and read no "
                                            "folder; drop --data-dir or choose another --dataset")
        check_readable(Path(cfg.data_dir).expanduser(), "--data-dir",
                        "the CIFAR-10 folder" if cfg.dataset == "cifar10" else "the subset file")
    elif cfg.dataset == "cifar10":
        raise ConfigError("--data-dir", "--dataset cifar10 needs --data-dir: the official "
                                        "'cifar-10-batches-py' folder or the folder holding it")
    elif cfg.dataset == "cifar10-subset" and find_cifar10_subset(None) is None:
        raise ConfigError("--data-dir", "--dataset cifar10-subset found no shared copy at its "
                                        "default location; pass --data-dir (the .npz or its "
                                        "folder)")
    check_writable_folder(Path(cfg.out_dir), "--out")
    if cfg.cache_dir is not None:
        check_writable_folder(Path(cfg.cache_dir), "--cache-dir")


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "cifar10", "cifar10-subset"],
                        help="digits: scikit-learn's bundled 8x8 digits (default); cifar10: the "
                             "official batches (needs --data-dir); cifar10-subset: the shared "
                             "5085/1017-image subset, or --data-dir")
    parser.add_argument("--data-dir", default=None,
                        help="cifar-10-batches-py folder (cifar10) or the subset .npz / folder "
                             "(cifar10-subset); not allowed with digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="non-negative seeds, one full run each (encoder, probe split, flow; "
                             "default: 0 1 2 3 4)")
    parser.add_argument("--out", default=None,
                        help="output folder for results.json, results.md and the plot "
                             "(default: results/<dataset>)")
    parser.add_argument("--cache-dir", default=None,
                        help="where encoder features and learned fields are cached "
                             "(default: <out>/cache)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the encoder and the learned fields: cpu "
                             "(default) or cuda[:index]")
    parser.add_argument("--encoder-epochs", type=int, default=None,
                        help="encoder training epochs, >= 1 (default: 20, the blog's)")
    parser.add_argument("--field-epochs", type=int, default=None,
                        help="learned-field training epochs, >= 1 (default: each preset's, 200)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the horizon sweep (accuracy along the flow) and its plot")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"use only the first N train and N/3 test examples, N >= "
                             f"{MIN_LIMIT} (quick runs)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: bars when stderr is a terminal)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch, BLAS and OpenMP threads for the run (default: 1; the "
                             "experiment's small problems run fastest on one thread a process)")
    parser.add_argument("--feature-dim", type=int, default=None,
                        help=f"size of the encoder's L2-normalised features (fc8), "
                             f"{MIN_FEATURE_DIM}..{MAX_FEATURE_DIM} (default: 128, the blog's); "
                             f"part of every cache key")
    parser.add_argument("--no-resume", action="store_true",
                        help="recompute seeds that this configuration already finished "
                             "(default: their stored results are reused, so a stopped run "
                             "resumes at the next seed; encoder features and learned fields "
                             "are cached either way)")
    parser.add_argument("--pfgm-plateau", action="store_true",
                        help="also the row 'flow: PFGM preset, to plateau': the PFGM field "
                             "trained until its validation loss plateaus (about 100 s of CPU "
                             "a seed on digits, so not in the default run)")
    parser.add_argument("--faithful", action="store_true",
                        help="the blog's code where it differs: N(0, 0.02) encoder init, raw "
                             "[0, 1] pixels in a fixed order, mean field loss, unshuffled "
                             "field batches (docs/BLOG_FAITHFULNESS.md)")


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(
        dataset=args.dataset, data_dir=args.data_dir, seeds=tuple(args.seeds),
        out_dir=args.out or f"results/{args.dataset}", cache_dir=args.cache_dir,
        device=args.device, encoder_epochs=args.encoder_epochs, field_epochs=args.field_epochs,
        sweep=not args.no_sweep, limit=args.limit,
        progress=False if args.no_progress else None, faithful=args.faithful,
        threads=args.threads, feature_dim=args.feature_dim, resume=not args.no_resume,
        pfgm_plateau=args.pfgm_plateau,
    )


def write_command(out_dir: Path) -> None:
    """command.txt beside the results: the command line that produces them (shared with
    ssl_experiment)."""
    import shlex

    from .._io import atomic_write_text

    argv = [a for a in sys.argv[1:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "command.txt",
                      "python -m poissonflow " + " ".join(shlex.quote(a) for a in argv) + "\n")


def main(args) -> int:
    """The `experiment` command. Bad settings raise ConfigError (a ValueError) before any
    work; the command line turns it into one line and exit code 2."""
    from . import report

    cfg = config_from_args(args)
    validate_config(cfg)
    write_command(Path(cfg.out_dir))
    results = run_experiment(cfg)
    print(report.markdown_table(results))
    print(f"\nwrote {Path(cfg.out_dir) / 'results.json'} and plots in {cfg.out_dir} "
          f"({results['seconds']:.0f} s)")
    return 0
