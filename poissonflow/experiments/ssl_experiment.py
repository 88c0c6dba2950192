"""The self-supervised encoders in the experiment:

    python -m poissonflow ssl-experiment --out docs/results/ssl-digits            # digits
    python -m poissonflow ssl-experiment --dataset cifar10-subset \\
        --objectives infonce align_uniform align_riesz --seeds 0 --riesz-s 2 \\
        --out docs/results/ssl-cifar10-subset

Per objective of `poissonflow.experiments.ssl` and seed: train SmallAlexNet without labels on two
augmented
views (`poissonflow.experiments.augment`; features cached per objective x seed, so a killed run
resumes),
then score the post-hoc rows of the supervised experiment (raw, centred L2, ZCA, the blog flow,
the PFGM flow, the exact flow) with its probes (blog LR, tuned linear, cosine k-NN, 1% / 10%
labels) through `experiment.row_graph` / `experiment.evaluate_rows` (imported, not copied; the
learned fields are cached by the experiment's own keys). Scored rows are cached too.

Every encoder trains on its seed's fit images only; the seed's validation split (protocol.py:
a stratified fifth of the training images) chooses the probes' C and k, and the test set is
scored once. Before the runs, when align_riesz is among the objectives and --riesz-s is
"validate" (the default), the Riesz exponent s is chosen on seed 0's split: one encoder per s
in --s-grid is trained on its fit images (seed 0), and the s whose features give the best
tuned-probe accuracy on its validation images wins (ties: the smaller s). Wang & Isola's
align_uniform is trained on the same split as the reference. Then the uniformity weight of
align_uniform and of align_riesz (at the chosen s) is chosen the same way from --weight-grid
(default 1 4 16; results.json "weight_validation"). The test set is not looked at. The curve
goes into results.json / results.md / s_validation.png.

Outputs in --out: results.json (every seed's rows, the summary over seeds, paired tests against
the raw features, the s curve, epochs and wall times), results.md, alignment_uniformity.png
(Wang & Isola's plot: alignment against uniformity of the test features, each encoder raw and
after each post-process, coloured by tuned-probe accuracy), s_validation.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ssl as _ssl
from .augment import augmentation_for
from .experiment import (
    RAW_ROW,
    ConfigError,
    Features,
    RunSettings,
    _is_int,
    evaluate_rows,
    representation_metrics,
    row_graph,
)
from .report import _jsonable
from .ssl_report import (  # noqa: F401 (rerender: the report command's)
    PROBE_KEYS,
    markdown,
    plot,
    render,
    rerender,
    riesz_vs_uniform,
    summarise,
)

__all__ = [
    "SSLExperimentConfig",
    "validate_config",
    "run_ssl_experiment",
    "add_arguments",
    "config_from_args",
    "main",
    "DEFAULT_ROWS",
    "S_GRID",
    "EPOCHS",
    "validate_s",
    "rerender",
]

DEFAULT_ROWS = (
    "raw features",
    "L2 (centred)",
    "ZCA whitening",
    "flow: blog preset",
    "flow: PFGM preset",
    "flow: exact field",
)
S_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Epoch budgets and batch sizes per data set: digits, 30 epochs of batch 128 (11 steps an
# epoch, about 0.7 s an epoch on one thread) keep 6 objectives x 3 seeds plus the s sweep and
# every row well under 30 minutes on the shared 2-core machine. CIFAR subset: see
# poissonflow/experiments/README.md.
EPOCHS = {"digits": 30, "cifar10-subset": 15, "cifar10": 15}
BATCH = {"digits": 128, "cifar10-subset": 256, "cifar10": 256}
BANK = {"digits": 1024, "cifar10-subset": 4096, "cifar10": 4096}
# Part of the scored rows' cache key: bump when the scoring of rows changes.
# 2: the probes scale with one StandardScaler fit on all training features (probes.py).
# 3: the protocol's validation split (protocol.py) and probes (experiment.score_row).
ROWS_CACHE_VERSION = 3
# The uniformity weights tried on the validation split, for align_uniform and (at the chosen
# s) align_riesz: at weight 1 the Riesz term barely uniformises (CIFAR-10 subset: uniform_loss
# -0.61 against align_uniform's -3.06).
WEIGHT_GRID = (1.0, 4.0, 16.0)
WEIGHTED = ("align_uniform", "align_riesz")


@dataclasses.dataclass
class SSLExperimentConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    objectives: tuple[str, ...] = tuple(_ssl.OBJECTIVES)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None  # None: EPOCHS[dataset]
    batch_size: int | None = None  # None: BATCH[dataset]
    riesz_s: float | str = "validate"
    s_grid: tuple[float, ...] = S_GRID
    bank_size: int | None = None  # None: BANK[dataset]
    riesz_weight: float = 1.0  # align_riesz's uniform_weight while s is chosen
    # uniformity weights of WEIGHTED chosen on the validation split (empty: riesz_weight and 1)
    weight_grid: tuple[float, ...] = WEIGHT_GRID
    validate_only: bool = False  # only the s validation (no encoders on the full train set)
    rows: tuple[str, ...] = DEFAULT_ROWS
    out_dir: str = "results/ssl-digits"
    cache_dir: str | None = None  # default: <out_dir>/cache
    device: str = "cpu"
    threads: int | None = 1
    limit: int | None = None
    progress: bool = False

    def resolved(self) -> SSLExperimentConfig:
        return dataclasses.replace(
            self,
            epochs=self.epochs or EPOCHS[self.dataset],
            batch_size=self.batch_size or BATCH[self.dataset],
            bank_size=self.bank_size if self.bank_size is not None else BANK[self.dataset],
        )


def validate_config(cfg: SSLExperimentConfig) -> None:
    """ConfigError (a ValueError naming the option) for any bad setting, before any work."""
    from . import experiment as E
    from .data import DATASETS, find_cifar10_subset

    if cfg.dataset not in DATASETS:
        raise ConfigError("--dataset", f"must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    objs = tuple(cfg.objectives) if isinstance(cfg.objectives, (list, tuple)) else ()
    if not objs or any(o not in _ssl.OBJECTIVES for o in objs) or len(set(objs)) != len(objs):
        raise ConfigError(
            "--objectives",
            f"must be distinct names among {', '.join(_ssl.OBJECTIVES)}, got {cfg.objectives!r}",
        )
    seeds = tuple(cfg.seeds) if isinstance(cfg.seeds, (list, tuple)) else ()
    if not seeds or any(not _is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", f"must be distinct non-negative integers, got {cfg.seeds!r}")
    for opt, v, lo in (
        ("--epochs", cfg.epochs, 1),
        ("--batch-size", cfg.batch_size, 2),
        ("--bank-size", cfg.bank_size, 0),
    ):
        if v is not None and (not _is_int(v) or v < lo):
            raise ConfigError(opt, f"must be an integer >= {lo}, got {v!r}")
    if cfg.threads is not None and (not _is_int(cfg.threads) or cfg.threads < 1):
        raise ConfigError("--threads", f"must be an integer >= 1, got {cfg.threads!r}")
    if cfg.limit is not None and (not _is_int(cfg.limit) or cfg.limit < E.MIN_LIMIT):
        raise ConfigError("--limit", f"must be an integer >= {E.MIN_LIMIT}, got {cfg.limit!r}")
    if cfg.riesz_s != "validate":
        if (
            isinstance(cfg.riesz_s, bool)
            or not isinstance(cfg.riesz_s, (int, float))
            or not math.isfinite(cfg.riesz_s)
            or cfg.riesz_s <= 0
        ):
            raise ConfigError(
                "--riesz-s", f"must be 'validate' or a number > 0, got {cfg.riesz_s!r}"
            )
    if (
        isinstance(cfg.riesz_weight, bool)
        or not isinstance(cfg.riesz_weight, (int, float))
        or not math.isfinite(cfg.riesz_weight)
        or cfg.riesz_weight <= 0
    ):
        raise ConfigError("--riesz-weight", f"must be a number > 0, got {cfg.riesz_weight!r}")
    if cfg.validate_only and ("align_riesz" not in objs or cfg.riesz_s != "validate"):
        raise ConfigError(
            "--validate-only", "needs align_riesz among --objectives and --riesz-s validate"
        )
    wgrid = tuple(cfg.weight_grid) if isinstance(cfg.weight_grid, (list, tuple)) else None
    if wgrid is None or any(
        isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0
        for w in wgrid
    ):
        raise ConfigError("--weight-grid", f"must be numbers > 0, got {cfg.weight_grid!r}")
    grid = tuple(cfg.s_grid) if isinstance(cfg.s_grid, (list, tuple)) else ()
    if not grid or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0
        for s in grid
    ):
        raise ConfigError("--s-grid", f"must be one or more numbers > 0, got {cfg.s_grid!r}")
    rows = tuple(cfg.rows) if isinstance(cfg.rows, (list, tuple)) else ()
    known = [n for n, _ in E.ROWS]
    if not rows or any(r not in known for r in rows):
        raise ConfigError("--rows", f"must be names among {known}, got {cfg.rows!r}")
    if RAW_ROW not in rows:
        raise ConfigError("--rows", f"must include {RAW_ROW!r} (the rows are compared with it)")
    E.check_device(cfg.device)
    if cfg.data_dir is not None:
        if cfg.dataset == "digits":
            raise ConfigError(
                "--data-dir",
                "digits are bundled with scikit-learn; drop --data-dir or choose another --dataset",
            )
        E.check_readable(Path(cfg.data_dir).expanduser(), "--data-dir", "the data")
    elif cfg.dataset == "cifar10":
        raise ConfigError("--data-dir", "--dataset cifar10 needs --data-dir")
    elif cfg.dataset == "cifar10-subset" and find_cifar10_subset(None) is None:
        raise ConfigError(
            "--data-dir", "--dataset cifar10-subset found no shared copy; pass --data-dir"
        )
    E.check_writable_folder(Path(cfg.out_dir), "--out")
    if cfg.cache_dir is not None:
        E.check_writable_folder(Path(cfg.cache_dir), "--cache-dir")


# --------------------------------------------------------------------------- pieces


def _settings(cfg: SSLExperimentConfig, seed: int) -> _ssl.SSLSettings:
    return _ssl.SSLSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        arch="digits" if cfg.dataset == "digits" else "blog",
    )


def _objective(cfg: SSLExperimentConfig, name: str, s: float | None, weight=None):
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


def validate_weights(cfg: SSLExperimentConfig, dataset, cache: Path, s) -> dict[str, Any]:
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


def validate_s(cfg: SSLExperimentConfig, dataset, cache: Path) -> dict[str, Any]:
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


def _row_cache_key(features_key: str, rows, seed: int) -> str:
    from .. import __version__
    from .cache import cache_key
    from .experiment import LEARNED_FIELD_CACHE_VERSION

    return cache_key(
        {
            "what": "ssl-rows",
            "version": ROWS_CACHE_VERSION,
            "rows": list(rows),
            "seed": seed,
            "poissonflow": __version__,
            "learned_field_cache_version": LEARNED_FIELD_CACHE_VERSION,
        },
        features_key,
    )


def run_encoder(
    cfg: SSLExperimentConfig, dataset, name: str, seed: int, s, cache: Path, weight=None
):
    """One objective x seed: features (cached) and the scored rows (cached). The encoder
    trains on the seed's fit images only; its validation images (protocol.py) choose the
    probes' C and k. Returns the per-seed record and the per-image predictions
    {row: {probe: labels}}."""
    from .cache import ArrayCache
    from .protocol import split_record, validation_split

    objective = _objective(cfg, name, s, weight)
    fit_i, val_i = validation_split(dataset.y_train, seed)
    x_fit, y_fit = dataset.x_train[fit_i], dataset.y_train[fit_i]
    y_val = dataset.y_train[val_i]
    t0 = time.perf_counter()
    enc = _ssl.encode_ssl(
        x_fit,
        dataset.x_test,
        _fingerprint(x_fit, dataset.x_test, dataset.x_train[val_i]),
        objective,
        augmentation_for(dataset.name),
        _settings(cfg, seed),
        device=cfg.device,
        cache_dir=cache,
        progress=cfg.progress,
        x_val=dataset.x_train[val_i],
    )
    encode_seconds = time.perf_counter() - t0
    store = ArrayCache(cache)
    rkey = _row_cache_key(enc.key, cfg.rows, seed)
    found = store.get(rkey)
    t1 = time.perf_counter()
    if found is not None:
        arrays, rows = found
        predictions: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            row, probe = k.split("|", 1)
            predictions.setdefault(row, {})[probe] = v
        rows_from_cache = True
    else:
        features = Features(
            enc.features_train, enc.features_test, tuple(enc.views_test), enc.features_val
        )
        run = RunSettings(seed=seed, device=cfg.device, progress=False, cache_dir=cache)
        graph = row_graph(features, (y_fit, dataset.y_test, y_val), run)
        rows = evaluate_rows(graph, cfg.rows)
        predictions = {r: rows[r].pop("_predictions") for r in rows}
        rows = _jsonable(rows)
        store.put(
            rkey,
            {f"{r}|{p}": np.asarray(v) for r, d in predictions.items() for p, v in d.items()},
            rows,
        )
        rows_from_cache = False
    record = {
        "objective": name,
        "seed": seed,
        "objective_settings": objective.config(),
        "ssl_settings": _settings(cfg, seed).to_dict(),
        "augmentation": augmentation_for(dataset.name).config(),
        "epochs": cfg.epochs,
        "epoch_loss": enc.history.epoch_loss,
        "train_seconds": enc.train_seconds,
        "encoder_from_cache": enc.from_cache,
        "rows_from_cache": rows_from_cache,
        "rows_seconds": time.perf_counter() - t1,
        "validation": split_record(fit_i, val_i),
        "encode_seconds_this_run": encode_seconds,
        "rows": rows,
    }
    return record, predictions


# --------------------------------------------------------------------------- the run


def run_ssl_experiment(cfg: SSLExperimentConfig, command: str = "") -> dict[str, Any]:
    validate_config(cfg)
    cfg = cfg.resolved()
    if cfg.threads is None:
        return _run(cfg, command)
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with threadpool_limits(limits=cfg.threads):
            return _run(cfg, command)
    finally:
        torch.set_num_threads(before)


def _run(cfg: SSLExperimentConfig, command: str) -> dict[str, Any]:
    from .experiment import load_limited

    t0 = time.perf_counter()
    dataset = load_limited(cfg.dataset, cfg.data_dir, cfg.limit)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"
    sv, s = None, None
    if "align_riesz" in cfg.objectives:
        if cfg.riesz_s == "validate":
            print(f"{dataset.name}: choosing the Riesz s on a validation split", file=sys.stderr)
            sv = validate_s(cfg, dataset, cache)
            s = sv["chosen_s"]
        else:
            s = float(cfg.riesz_s)
    wv = validate_weights(cfg, dataset, cache, s) if cfg.weight_grid else {}
    weights = {name: v["chosen"] for name, v in wv.items()}
    records, predictions = [], {}
    state = {
        "cfg": cfg,
        "dataset": dataset,
        "sv": sv,
        "s": s,
        "t0": t0,
        "command": command,
        "wv": wv,
    }
    for seed in () if cfg.validate_only else cfg.seeds:
        for name in cfg.objectives:
            print(f"{dataset.name}: {name} seed {seed}", file=sys.stderr, flush=True)
            rec, pred = run_encoder(cfg, dataset, name, seed, s, cache, weights.get(name))
            records.append(rec)
            predictions.setdefault(name, {})[seed] = (pred, np.asarray(dataset.y_test))
            raw = rec["rows"][RAW_ROW]
            print(
                f"  {name} seed {seed}: raw tuned {raw['tuned']['test']:.3f}, train "
                f"{rec['train_seconds']:.0f} s (cached: {rec['encoder_from_cache']}), rows "
                f"{rec['rows_seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            _write(state, records, predictions, complete=False)
    return _write(state, records, predictions, complete=True)


def _write(state, records, predictions, *, complete: bool) -> dict[str, Any]:
    from .. import __version__
    from .._io import atomic_write_text
    from . import report

    cfg, dataset = state["cfg"], state["dataset"]
    from .protocol import _compare

    paired, seed_aware = {}, {}
    if complete:
        for name, pred in predictions.items():
            paired[name] = report.paired_statistics(pred)
    for name, pred in predictions.items():  # every objective, as its seeds land
        seed_aware[name] = _compare(pred, None)
    results = {
        "config": dataclasses.asdict(cfg),
        "command": state["command"],
        "dataset": {
            "name": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "source": str(dataset.source),
        },
        "augmentation": augmentation_for(dataset.name).config(),
        "versions": {
            "poissonflow": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "torch_threads": torch.get_num_threads(),
        "riesz_s": state["s"],
        "s_validation": state["sv"],
        "weight_validation": state["wv"],
        "per_encoder": records,
        "summary": summarise(records, cfg.rows),
        "paired": paired,
        "seed_aware": seed_aware,
        "riesz_vs_uniform": riesz_vs_uniform(records),
        "seconds": time.perf_counter() - state["t0"],
        "complete": complete,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(_jsonable(results), indent=1))
    render(results, out)
    return results


# --------------------------------------------------------------------------- command line


def _s_value(text: str):
    if text == "validate":
        return text
    import argparse

    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'validate', got {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument(
        "--dataset", default="digits", choices=["digits", "cifar10", "cifar10-subset"]
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="cifar-10-batches-py folder or the subset .npz (not for digits)",
    )
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=list(_ssl.OBJECTIVES),
        help=f"SSL objectives (default: all: {' '.join(_ssl.OBJECTIVES)})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"encoder epochs (default per data set: {EPOCHS})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"pairs per step (default per data set: {BATCH})",
    )
    parser.add_argument(
        "--riesz-s",
        type=_s_value,
        default="validate",
        help="Riesz exponent of align_riesz, or 'validate' (default: chosen "
        "from --s-grid on a validation split of train)",
    )
    parser.add_argument("--s-grid", type=float, nargs="+", default=list(S_GRID))
    parser.add_argument(
        "--bank-size",
        type=int,
        default=None,
        help=f"align_riesz memory bank rows (default per data set: {BANK})",
    )
    parser.add_argument(
        "--riesz-weight",
        type=float,
        default=1.0,
        help="weight of align_riesz's uniformity term (default 1, as Wang & Isola weight theirs)",
    )
    parser.add_argument(
        "--weight-grid",
        type=float,
        nargs="*",
        default=list(WEIGHT_GRID),
        help="uniformity weights of align_uniform and align_riesz tried on the "
        "validation split (default: 1 4 16; none: --riesz-weight and 1)",
    )
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="only the s validation of align_riesz (results.json holds the curve)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(DEFAULT_ROWS),
        help="experiment rows to score (names as in poissonflow.experiments.experiment)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: results/ssl-<dataset>)"
    )
    parser.add_argument("--cache-dir", default=None, help="cache (default: <out>/cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N train and N/3 test images (quick runs)",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars")


def config_from_args(args) -> SSLExperimentConfig:
    return SSLExperimentConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        objectives=tuple(args.objectives),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        batch_size=args.batch_size,
        riesz_s=args.riesz_s,
        s_grid=tuple(args.s_grid),
        bank_size=args.bank_size,
        riesz_weight=args.riesz_weight,
        weight_grid=tuple(args.weight_grid),
        validate_only=args.validate_only,
        rows=tuple(args.rows),
        out_dir=args.out or f"results/ssl-{args.dataset}",
        cache_dir=args.cache_dir,
        device=args.device,
        threads=args.threads,
        limit=args.limit,
        progress=args.progress,
    )


def main(args) -> int:
    cfg = config_from_args(args)
    validate_config(cfg)
    import shlex

    command = (
        "python -m poissonflow ssl-experiment " + shlex.join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "ssl-experiment"
        else ""
    )
    from .config import write_command

    write_command(Path(cfg.out_dir))
    results = run_ssl_experiment(cfg, command=command)
    print(markdown(results))
    return 0
