"""The experiment's rows: the graph of values a seed computes (the encoder's features, the
learned fields, the flows and their controls), how each row is scored by every probe, and the
horizon sweep (docs/DESIGN.md, "The learned field" and "Metrics and probes"). experiment.py
runs them per seed; ssl_experiment.py scores its encoders' features with the same rows.
(Just over 600 lines, kept whole: the rows, the fields they share and the sweep are the nodes
of one graph, NODES, and each node names the others it needs.)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from .probes import knn_predict, knn_tuned, labels_per_class_probe, linear_probe

__all__ = [
    "BLOG_ROW",
    "NODES",
    "OPTIONAL_ROWS",
    "ROWS",
    "Features",
    "Graph",
    "Node",
    "RowOutput",
    "RunSettings",
    "evaluate_rows",
    "row_graph",
    "row_names",
    "score_row",
]


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
        return Features(
            f(self.train),
            f(self.test),
            tuple(f(v) for v in self.views),
            None if self.val is None else f(self.val),
        )


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
        {
            "what": "learned-field",
            "cache_version": LEARNED_FIELD_CACHE_VERSION,
            "file_format": FILE_FORMAT,
            "poissonflow": __version__,
            "torch": torch.__version__,
            "params": settings,
        },
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
            return FittedField(field.fit(features.train, progress=False, train=False), 0.0, False)
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
            learned_field_key(field.get_params(), features.train),
            fit,
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
        return RowOutput(
            flowed,
            {
                "field_train_seconds": fitted.train_seconds,
                "field_from_cache": fitted.from_cache,
                "field_preset": field.preset,
                **counts,
                # over the train, test and view sets flowed (docs/DESIGN.md, "The flow")
                "guarded_fraction": counts["guarded_points"] / n,
                "on_plane_fraction": counts["on_plane"] / n,
                "norm_max_over_median": float(norms.max() / max(np.median(norms), 1e-300)),
                "field_iterations": int(field.n_iterations_),
                "field_final_loss": field.loss_history_[-1] if field.loss_history_ else None,
                "field_loss_history": [float(v) for v in field.loss_history_],
                "field_val_loss_history": [
                    list(v) for v in getattr(field, "val_loss_history_", [])
                ],
                "field_plateau_epoch": getattr(field, "plateau_epoch_", None),
            },
        )

    return Node(("features", field_node), make)


def _scale_control(features, blog):
    """Raw features times the blog-flowed train features' mean norm (same classifier)."""
    s = float(np.linalg.norm(blog.features.train, axis=1).mean())
    return RowOutput(features.map(lambda a: a * s), {"scale": s})


def _unit_norm(flowed):
    """Control: a flowed row's features scaled back to unit norm (only the directions the flow
    gave them; the norm, which a fixed-C classifier reads as a regularisation strength, gone)."""
    return RowOutput(
        flowed.features.map(
            lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
        ),
        {},
    )


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
    return RowOutput(
        out,
        {
            "clip_radius": radius,
            **counts,
            "clipped_fraction": counts["clipped"] / max(1, counts["points"]),
        },
    )


def _exact_flow(features):
    from ..transform import transform

    infos = []

    def flow(a):
        out, info = transform(a, charges=features.train, return_info=True, progress=False)
        infos.append(info)
        return out

    flowed = features.map(flow)
    i = infos[0]  # the train features' flow
    return RowOutput(
        flowed,
        {
            "z_min": i["z_min"],
            "z_max": i["z_max"],
            "steps": i["steps"],
            "train_excluded": i["excluded"],
        },
    )


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
        out["alignment"] = float(
            metrics.align_loss(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True))
        )
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
    preds = {
        "blog": blog.test_predictions,
        "tuned": tuned.test_predictions,
        "blog_converged": conv.test_predictions,
    }
    row: dict[str, Any] = {
        "blog": {
            "train": blog.train_accuracy,
            "test": blog.test_accuracy,
            "n_iter": blog.n_iter,
            "convergence_warnings": len(blog.convergence_warnings),
        },
        "tuned": {
            "train": tuned.train_accuracy,
            "val": tuned.val_accuracy,
            "test": tuned.test_accuracy,
            "C": tuned.C,
            "val_accuracies": {f"{c:g}": v for c, v in tuned.val_accuracies.items()},
            "convergence_warnings": len(tuned.convergence_warnings),
        },
        "blog_converged": {
            "train": conv.train_accuracy,
            "test": conv.test_accuracy,
            "C": 1.0,
            "n_iter": conv.n_iter,
            "convergence_warnings": len(conv.convergence_warnings),
        },
    }
    smallest = int(np.unique(ytr, return_counts=True)[1].min())
    pred = knn_predict(ftr, ytr, fte, k=min(KNN_FIXED, smallest))
    preds["knn20"] = pred
    row["knn20"] = {"test": float((pred == yte).mean()), "k": min(KNN_FIXED, smallest)}
    pred, k, val_acc = knn_tuned(ftr, ytr, fva, yva, fte)
    preds["knn"] = pred
    row["knn"] = {
        "test": float((pred == yte).mean()),
        "k": k,
        "val": val_acc[k],
        "val_accuracies": {str(kk): v for kk, v in val_acc.items()},
        "k_cap": smallest,
    }
    for per_class in LABELS_PER_CLASS:
        low = labels_per_class_probe(ftr, ytr, fte, yte, fva, yva, per_class=per_class, seed=seed)
        name = f"labels{per_class}perclass"
        preds[name] = low.test_predictions
        row[name] = {
            "train": low.train_accuracy,
            "val": low.val_accuracy,
            "test": low.test_accuracy,
            "C": low.C,
            "n_labels": low.n_train_used,
            "convergence_warnings": len(low.convergence_warnings),
        }
    row["convergence_warnings"] = sum(
        v["convergence_warnings"]
        for v in row.values()
        if isinstance(v, dict) and "convergence_warnings" in v
    )
    row["metrics"] = representation_metrics(fte, views)
    row["dim"] = int(ftr.shape[1])
    row["mean_norm"] = float(np.linalg.norm(fte, axis=1).mean())
    row["_predictions"] = preds
    return row


# --------------------------------------------------------------------------- horizon sweep


def horizon_sweep(
    features: Features, labels, run: RunSettings, blog: FittedField
) -> list[dict[str, Any]]:
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
    for k in sorted(
        {
            0,
            total // 20,
            total // 10,
            total // 5,
            2 * total // 5,
            3 * total // 5,
            4 * total // 5,
            total,
        }
    ):
        if k == 0:
            gtr, gva, gte = (np.hstack([a, np.zeros((len(a), 1))]) for a in (ftr, fva, fte))
        else:
            gtr, gva, gte = (
                transform(a, field=field, steps=k, output="raw") for a in (ftr, fva, fte)
            )
        points.append(
            _sweep_point("blog preset", "steps", k, k / total, gtr, ytr, gte, yte, gva, yva)
        )
    charges = torch.from_numpy(np.ascontiguousarray(ftr, dtype=np.float64))
    zmin, zmax = auto_z_min(charges), auto_z_max(charges)
    for zend in np.geomspace(2 * zmin, zmax, 7):
        gtr, gva, gte = (transform(a, charges=ftr, z_max=float(zend)) for a in (ftr, fva, fte))
        frac = float(np.log(zend / zmin) / np.log(zmax / zmin))
        points.append(
            _sweep_point("exact field", "z_max", float(zend), frac, gtr, ytr, gte, yte, gva, yva)
        )
    return points


def _sweep_point(curve, knob, value, fraction, gtr, ytr, gte, yte, gva, yva):
    """One point of a sweep; `fraction` is how far along the flow it is (blog: steps / 100,
    exact field: log(z_end / z_min) / log(z_max / z_min)). val_accuracy is what a horizon
    would be chosen by; test_accuracy is reported, never chosen on."""
    tuned = linear_probe(gtr, ytr, gte, yte, val_x=gva, val_y=yva)
    m = representation_metrics(gte, ())
    return {
        "curve": curve,
        "knob": knob,
        "value": value,
        "fraction": fraction,
        "val_accuracy": tuned.val_accuracy,
        "test_accuracy": tuned.test_accuracy,
        "wasserstein_uniformity": m["wasserstein_uniformity"],
        "uniform_loss": m["uniform_loss"],
    }


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
        print(
            f"  seed {run.seed}: {name:24s} tuned test {row['tuned']['test']:.3f} "
            f"({row['seconds']:.1f} s)",
            file=sys.stderr,
        )
    return out
