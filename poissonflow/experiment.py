"""The end-to-end experiment: does Poisson-flow uniformity improve downstream accuracy?

    python -m poissonflow experiment                       # digits, 3 seeds, a few minutes
    python -m poissonflow experiment --dataset cifar10-subset --seeds 0 1 2
    python -m poissonflow experiment --dataset cifar10 --data-dir ~/data/cifar-10-batches-py

Per seed: train the encoder (the blog's SmallAlexNet through a linear head; features cached on
disk), then evaluate every row of the table below on the same features, and sweep the horizon
of the flow. Rows (DESIGN.md sections 4-5):

  encoder head          the head's own accuracy (what the blog reports as "AlexNet")
  raw features          the baseline the blog never ran
  L2 (centred)          centre with the train mean, then L2-normalise (the encoder's features
                        are already unit vectors, so plain L2 would change nothing)
  ZCA whitening         fitted on train
  flow: blog preset     learned field, the blog's code (radial Euler 100 x 0.01 from z = 0),
                        the 129-d end points as the blog fed them to LogisticRegression()
  scale control         raw features times the blog-flowed features' mean norm: the default
                        LogisticRegression (C = 1) is regularised according to feature norm
  flow: blog, unit norm the blog-flowed features scaled back to unit norm
  flow: PFGM preset     learned field, PFGM's defaults and log-z RK4, on the sphere
  flow: exact field     the empirical field of the train features (plane start, automatic
                        horizon, leave-one-out), on the sphere

Each row is scored by the blog's classifier (scikit-learn's default LogisticRegression() on
unscaled features) and by the tuned linear probe (StandardScaler, lbfgs, C chosen on a
validation split of train, test scored once). Representation metrics are computed on the test
features after L2 normalisation (Wang & Isola's alignment on two augmented views of each test
image, their uniformity with t = 2, Fang et al.'s Wasserstein uniformity, effective rank).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import metrics
from .probes import linear_probe

__all__ = ["ExperimentConfig", "run_experiment", "main"]


@dataclasses.dataclass
class ExperimentConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    out_dir: str = "results/digits"
    cache_dir: str | None = None  # default: <out_dir>/cache
    device: str = "cpu"
    encoder_epochs: int | None = None  # None: the dataset's default (digits 20, CIFAR-10 20)
    field_epochs: int | None = None  # None: each preset's default
    sweep: bool = True
    limit: int | None = None  # use only the first `limit` train and limit // 3 test examples
    progress: bool | None = None  # None: progress bars when stderr is a terminal


# --------------------------------------------------------------------------- feature makers
# Each row turns (train features, test features, test views) into new features; returns
# (train, test, views, extra info). Fitted on train only.


def _identity(ftr, fte, views, ctx):
    return ftr, fte, views, {}


def _l2_centred(ftr, fte, views, ctx):
    mean = ftr.mean(0, keepdims=True)

    def f(a):
        c = a - mean
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    return f(ftr), f(fte), tuple(f(v) for v in views), {}


def _zca(ftr, fte, views, ctx, eps=1e-5):
    """ZCA whitening W = U diag(1 / sqrt(lambda + eps * mean lambda)) U^T, fitted on train."""
    x = ftr.astype(np.float64)
    mean = x.mean(0, keepdims=True)
    cov = np.cov(x - mean, rowvar=False, bias=True)
    lam, U = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    W = (U / np.sqrt(lam + eps * lam.mean())) @ U.T

    def f(a):
        return (a - mean) @ W

    return f(ftr), f(fte), tuple(f(v) for v in views), {}


def _learned_flow(preset: str, output: str):
    def make(ftr, fte, views, ctx):
        from .learned import LearnedField
        from .transform import transform

        key = ("field", preset)
        if key not in ctx:
            kwargs = {"preset": preset, "seed": ctx["seed"], "device": ctx["device"]}
            if ctx["field_epochs"] is not None:
                kwargs["epochs"] = ctx["field_epochs"]
            t0 = time.perf_counter()
            field = LearnedField(**kwargs).fit(ftr, progress=ctx["progress"])
            ctx[key] = field
            ctx[("field_seconds", preset)] = time.perf_counter() - t0
        field = ctx[key]
        outs = []
        guard = 0
        for a in (ftr, fte) + tuple(views):
            out, info = transform(a, field=field, output=output, return_info=True)
            guard += info.get("guard_fired", 0)
            outs.append(out)
        info = {"field_train_seconds": ctx[("field_seconds", preset)], "guard_fired": guard}
        if preset == "blog":
            ctx["blog_flow"] = (outs[0], outs[1], tuple(outs[2:]))  # for the control rows
        return outs[0], outs[1], tuple(outs[2:]), info

    return make


def _scale_control(ftr, fte, views, ctx):
    """Raw features times the blog-flowed train features' mean norm (same classifier)."""
    s = float(np.linalg.norm(ctx["blog_flow"][0], axis=1).mean())
    return ftr * s, fte * s, tuple(v * s for v in views), {"scale": s}


def _blog_unit(ftr, fte, views, ctx):
    """The blog-flowed features scaled back to unit norm."""
    gtr, gte, gviews = ctx["blog_flow"]

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return unit(gtr), unit(gte), tuple(unit(v) for v in gviews), {}


def _exact_flow(ftr, fte, views, ctx):
    from .transform import transform

    outs, infos = [], []
    for a in (ftr, fte) + tuple(views):
        out, info = transform(a, charges=ftr, return_info=True, progress=False)
        outs.append(out)
        infos.append(info)
    i = infos[0]
    return outs[0], outs[1], tuple(outs[2:]), {
        "z_min": i["z_min"], "z_max": i["z_max"], "steps": i["steps"],
        "train_excluded": i["excluded"],
    }


ROWS: list[tuple[str, Callable]] = [
    ("raw features", _identity),
    ("L2 (centred)", _l2_centred),
    ("ZCA whitening", _zca),
    ("flow: blog preset", _learned_flow("blog", "raw")),
    ("scale control", _scale_control),
    ("flow: blog, unit norm", _blog_unit),
    ("flow: PFGM preset", _learned_flow("pfgm", "sphere")),
    ("flow: exact field", _exact_flow),
]


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


def score_row(ftr, ytr, fte, yte, views, seed) -> dict[str, Any]:
    blog = linear_probe(ftr, ytr, fte, yte, blog=True)
    tuned = linear_probe(ftr, ytr, fte, yte, seed=seed)
    return {
        "blog": {"train": blog.train_accuracy, "test": blog.test_accuracy,
                 "convergence_warnings": len(blog.convergence_warnings)},
        "tuned": {"train": tuned.train_accuracy, "val": tuned.val_accuracy,
                  "test": tuned.test_accuracy, "C": tuned.C,
                  "convergence_warnings": len(tuned.convergence_warnings)},
        "metrics": representation_metrics(fte, views),
        "dim": int(ftr.shape[1]),
        "mean_norm": float(np.linalg.norm(fte, axis=1).mean()),
    }


# --------------------------------------------------------------------------- horizon sweep


def horizon_sweep(ftr, ytr, fte, yte, ctx) -> list[dict[str, Any]]:
    """Accuracy and uniformity along the flow: the blog preset after k of its 100 steps, and
    the exact field stopped at growing z_max. Each point: tuned-probe test accuracy, W2,
    uniform_loss."""
    from .horizon import auto_z_max, auto_z_min
    from .transform import transform

    points = []
    field = ctx.get(("field", "blog"))
    if field is not None:
        total = field.default_flow().get("steps", 100)
        for k in sorted({0, total // 20, total // 10, total // 5, 2 * total // 5,
                         3 * total // 5, 4 * total // 5, total}):
            if k == 0:
                gtr = np.hstack([ftr, np.zeros((len(ftr), 1))])
                gte = np.hstack([fte, np.zeros((len(fte), 1))])
            else:
                gtr = transform(ftr, field=field, steps=k, output="raw")
                gte = transform(fte, field=field, steps=k, output="raw")
            points.append(
                _sweep_point("blog preset", "steps", k, k / total, gtr, ytr, gte, yte, ctx)
            )
    charges = torch.from_numpy(np.ascontiguousarray(ftr, dtype=np.float64))
    zmin, zmax = auto_z_min(charges), auto_z_max(charges)
    for zend in np.geomspace(2 * zmin, zmax, 7):
        gtr = transform(ftr, charges=ftr, z_max=float(zend))
        gte = transform(fte, charges=ftr, z_max=float(zend))
        frac = float(np.log(zend / zmin) / np.log(zmax / zmin))
        points.append(
            _sweep_point("exact field", "z_max", float(zend), frac, gtr, ytr, gte, yte, ctx)
        )
    return points


def _sweep_point(curve, knob, value, fraction, gtr, ytr, gte, yte, ctx):
    """One point of a sweep; `fraction` is how far along the flow it is (blog: steps / 100,
    exact field: log(z_end / z_min) / log(z_max / z_min))."""
    tuned = linear_probe(gtr, ytr, gte, yte, seed=ctx["seed"])
    m = representation_metrics(gte, ())
    return {"curve": curve, "knob": knob, "value": value, "fraction": fraction,
            "test_accuracy": tuned.test_accuracy,
            "wasserstein_uniformity": m["wasserstein_uniformity"],
            "uniform_loss": m["uniform_loss"]}


# --------------------------------------------------------------------------- the run


def run_seed(dataset, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    from .encoder import default_settings, encode_dataset

    settings = default_settings(dataset.name).replace(seed=seed)
    if cfg.encoder_epochs is not None:
        settings = settings.replace(epochs=cfg.encoder_epochs)
    t0 = time.perf_counter()
    enc = encode_dataset(dataset, settings, device=cfg.device, cache_dir=_cache_dir(cfg),
                         progress=cfg.progress)
    seconds = {"encoder": time.perf_counter() - t0}
    ytr, yte = dataset.y_train, dataset.y_test
    ftr, fte, views = enc.features_train, enc.features_test, enc.views_test
    rows: dict[str, Any] = {
        "encoder head": {
            "head": {"train": enc.train_acc, "train_augmented": enc.train_acc_augmented,
                     "train_last_epoch": enc.history.epoch_acc[-1], "test": enc.test_acc},
            "metrics": representation_metrics(fte, views),
            "dim": int(ftr.shape[1]), "encoder_from_cache": enc.from_cache,
        }
    }
    ctx: dict[Any, Any] = {"seed": seed, "device": cfg.device, "progress": cfg.progress,
                           "field_epochs": cfg.field_epochs}
    for name, make in ROWS:
        t = time.perf_counter()
        gtr, gte, gviews, info = make(ftr, fte, views, ctx)
        row = score_row(gtr, ytr, gte, yte, gviews, seed)
        row["info"] = info
        row["seconds"] = time.perf_counter() - t
        rows[name] = row
        print(f"  seed {seed}: {name:24s} tuned test {row['tuned']['test']:.3f} "
              f"({row['seconds']:.1f} s)", file=sys.stderr)
    out = {"seed": seed, "rows": rows, "seconds": seconds}
    if cfg.sweep:
        t = time.perf_counter()
        out["sweep"] = horizon_sweep(ftr, ytr, fte, yte, ctx)
        seconds["sweep"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return out


def _cache_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    from . import __version__, report
    from .data import load_dataset

    if cfg.progress is None:
        cfg = dataclasses.replace(cfg, progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.limit is not None:
        n_test = max(10, cfg.limit // 3)
        dataset = dataclasses.replace(
            dataset, x_train=dataset.x_train[: cfg.limit], y_train=dataset.y_train[: cfg.limit],
            x_test=dataset.x_test[:n_test], y_test=dataset.y_test[:n_test],
        )
    per_seed = []
    for seed in cfg.seeds:
        print(f"{dataset.name}: seed {seed}", file=sys.stderr)
        per_seed.append(run_seed(dataset, cfg, seed))
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
        "seconds": time.perf_counter() - t0,
    }
    report.write_outputs(results, Path(cfg.out_dir))
    return results


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "cifar10", "cifar10-subset"])
    parser.add_argument("--data-dir", default=None,
                        help="cifar-10-batches-py folder (cifar10) or the subset .npz / folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="output folder (default results/<dataset>)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder-epochs", type=int, default=None)
    parser.add_argument("--field-epochs", type=int, default=None)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N train (N/3 test) examples (quick runs)")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(
        dataset=args.dataset, data_dir=args.data_dir, seeds=tuple(args.seeds),
        out_dir=args.out or f"results/{args.dataset}", cache_dir=args.cache_dir,
        device=args.device, encoder_epochs=args.encoder_epochs, field_epochs=args.field_epochs,
        sweep=not args.no_sweep, limit=args.limit,
        progress=False if args.no_progress else None,
    )


def main(args) -> int:
    from . import report

    cfg = config_from_args(args)
    results = run_experiment(cfg)
    print(report.markdown_table(results))
    print(f"\nwrote {Path(cfg.out_dir) / 'results.json'} and plots in {cfg.out_dir} "
          f"({results['seconds']:.0f} s)")
    return 0
