"""The end-to-end experiment: does Poisson-flow uniformity improve downstream accuracy?

    python -m poissonflow experiment                       # digits, 5 seeds, a few minutes
    python -m poissonflow experiment --dataset cifar10-subset --seeds 0 1 2
    python -m poissonflow experiment --dataset cifar10 --data-dir ~/data/cifar-10-batches-py

Per seed: hold out the seed's validation split (protocol.py: a stratified fifth of the
training images, which nothing trains on), train the encoder on the rest (the blog's
SmallAlexNet through a linear head; features cached on disk), then evaluate every row of the
table below on the same features (rows.py), and sweep the horizon of the flow. Each row
declares the values it needs (the graph in rows.py), so any row can be computed
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
                        blog's published code never reaches its optimiser step
                        (docs/DESIGN.md, "The learned field")
  flow: blog preset, to plateau  the blog field trained until its loss plateaus
                        (PLATEAU below), same ODE
  scale control         raw features times the blog-flowed features' mean norm: the default
                        LogisticRegression (C = 1) is regularised according to feature norm
  flow: blog, unit norm the blog-flowed features scaled back to unit norm (the same control
                        for the untrained field and the field to plateau)
  ..., far points clipped  each blog-ODE row with its points beyond 3 x the median norm pulled
                        back to that radius (the far points' effect)
  flow: PFGM preset     learned field, PFGM's defaults and log-z RK4, on the sphere
  flow: PFGM preset, to plateau  (only with --pfgm-plateau, OPTIONAL_ROWS) the PFGM field
                        (weights averaged, EMA 0.9999) trained until its validation loss
                        plateaus (PLATEAU), same ODE
  flow: exact field     the empirical field of the train features (plane start, automatic
                        horizon, leave-one-out), on the sphere

Each row is scored by the blog's classifier (scikit-learn's default LogisticRegression() on
unscaled features) and the same classifier run to convergence (iterations recorded), by the
tuned linear probe (StandardScaler, lbfgs, C chosen on the validation split, test scored
once), by cosine k-NN (k = 20, and k chosen on the validation split, both at most the smallest
class) and by linear probes fit on 1 and 10 labelled images a class (C chosen on the
validation split; a probe of the features). Every probe's per-image test predictions are kept
(predictions.npz) and every row is compared with the raw features: the seed-aware statistics
(results.json "seed_aware": two-level bootstrap over seeds and test images, t-test over seeds,
the primary comparison alone and the rest Benjamini-Hochberg corrected; protocol._compare),
and the earlier image-only comparison ("paired", probes.paired_comparison).

Resuming (runner.py, the one runner of both studies; a seed is this study's unit): each
finished seed's results are stored in the cache folder (seed_result_key), and
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import (  # noqa: F401 (MIN_LIMIT re-exported: the smallest --limit)
    MIN_LIMIT,
    ConfigError,
    _is_int,
    add_common_arguments,
    check_flag,
    check_readable,
    check_writable_folder,
    common_settings,
    validate_common,
    write_command,
)
from .encoder import MAX_FEATURE_DIM, MIN_FEATURE_DIM
from .protocol import VAL_FRACTION
from .rows import (  # noqa: F401 (re-exported: the rows are part of the experiment's API)
    BLOG_ROW,
    CLIP_FACTOR,
    KNN_FIXED,
    LABELS_PER_CLASS,
    LEARNED_FIELD_CACHE_VERSION,
    NODES,
    OPTIONAL_ROWS,
    PFGM_PLATEAU_ROW,
    PLATEAU,
    PLATEAU_ROW,
    RAW_ROW,
    ROWS,
    SWEEP,
    UNTRAINED_ROW,
    Features,
    FittedField,
    Graph,
    Node,
    RowOutput,
    RunSettings,
    evaluate_rows,
    horizon_sweep,
    learned_field_key,
    representation_metrics,
    row_graph,
    row_names,
    score_row,
)
from .runner import Unit, cache_dir, run_study, unit_key, versions

__all__ = [
    "ExperimentConfig",
    "ConfigError",
    "validate_config",
    "run_experiment",
    "main",
    "ROWS",
    "OPTIONAL_ROWS",
    "row_names",
    "NODES",
    "Graph",
    "Node",
    "Features",
    "RowOutput",
    "RunSettings",
    "row_graph",
    "evaluate_rows",
    "check_readable",
    "check_writable_folder",
]


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
    fit = dataclasses.replace(
        dataset, x_train=dataset.x_train[fit_idx], y_train=dataset.y_train[fit_idx]
    )
    enc = encode_dataset(
        fit,
        settings,
        device=cfg.device,
        cache_dir=cache_dir(cfg),
        progress=cfg.progress,
        x_val=dataset.x_train[val_idx],
    )
    seconds = {"encoder": time.perf_counter() - t0}
    ytr, yte, yva = fit.y_train, dataset.y_test, dataset.y_train[val_idx]
    features = Features(
        enc.features_train, enc.features_test, tuple(enc.views_test), enc.features_val
    )
    rows: dict[str, Any] = {
        "encoder head": {
            "head": {
                "train": enc.train_acc,
                "train_augmented": enc.train_acc_augmented,
                "train_last_epoch": enc.history.epoch_acc[-1],
                "test": enc.test_acc,
            },
            "metrics": representation_metrics(features.test, features.views),
            "dim": int(features.train.shape[1]),
            "encoder_from_cache": enc.from_cache,
            "encoder_settings": settings.to_dict(),
        }
    }
    run = RunSettings(
        seed=seed,
        device=cfg.device,
        progress=bool(cfg.progress),
        field_epochs=cfg.field_epochs,
        cache_dir=cache_dir(cfg),
        blog_preset="blog-faithful" if cfg.faithful else "blog",
    )
    graph = row_graph(features, (ytr, yte, yva), run)
    rows.update(evaluate_rows(graph, row_names(cfg.pfgm_plateau)))
    predictions = {"encoder head": {"head": enc.logits_test.argmax(1)}}
    for name, row in rows.items():
        if "_predictions" in row:
            predictions[name] = row.pop("_predictions")
    out = {
        "seed": seed,
        "rows": rows,
        "seconds": seconds,
        "predictions": predictions,
        "y_test": np.asarray(yte),
        "validation": split_record(fit_idx, val_idx),
    }
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

    settings = default_settings(
        dataset_name, faithful=cfg.faithful, feature_dim=cfg.feature_dim
    ).replace(seed=seed)
    if cfg.encoder_epochs is not None:
        settings = settings.replace(epochs=cfg.encoder_epochs)
    return settings


# ------------------------------------------------------------------ finished seeds, resumed
# The unit of this study's work is a seed (runner.py runs the units, stores each finished one
# under its key and reads it back on resume). Bump SEED_RESULT_VERSION whenever a change here,
# in probes.py, metrics.py, transform.py or flow.py changes what a seed's rows hold.
# 2: the probes scale with one StandardScaler fit on all training features (probes.py).
# 3: the held-out validation split (protocol.py), converged blog classifier, k-NN k on
# validation, labels-per-class probes, unit-norm and clipped controls.
SEED_RESULT_VERSION = 3


def seed_result_key(cfg: ExperimentConfig, dataset, seed: int) -> str:
    """Cache key of one seed's results (runner.unit_key: the versions, the data and the
    shared settings) with the settings of this study that change them."""
    return unit_key(
        cfg,
        dataset,
        seed,
        "experiment-seed",
        {
            "seed_result_version": SEED_RESULT_VERSION,
            "encoder_settings": encoder_settings(cfg, dataset.name, seed).to_dict(),
            "field_epochs": cfg.field_epochs,
            "faithful": cfg.faithful,
            "sweep": cfg.sweep,
            "rows": row_names(cfg.pfgm_plateau),
            "plateau": PLATEAU,
            "clip_factor": CLIP_FACTOR,
        },
    )


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Runs every seed (runner.run_study: one thread by default, resume) and writes the
    outputs after each seed, marked incomplete until the last."""
    validate_config(cfg)
    return run_study(cfg, SupervisedStudy())


class SupervisedStudy:
    """The experiment as the runner's study: a unit per seed (run_seed), written as
    results.json "per_seed"."""

    def units(self, cfg: ExperimentConfig, dataset, cache: Path) -> list[Unit]:
        return [
            Unit(
                label=f"seed {seed}",
                key=seed_result_key(cfg, dataset, seed),
                run=lambda seed=seed: _seed_unit(dataset, cfg, seed),
                meta={"what": "experiment-seed", "seed": int(seed)},
            )
            for seed in cfg.seeds
        ]

    def write(self, cfg, dataset, done, t0, *, complete: bool) -> dict[str, Any]:
        per_seed = [d.record for d in done]
        predictions = {int(d.record["seed"]): (d.predictions, d.y_test) for d in done}
        return _write(cfg, dataset, per_seed, predictions, t0, complete=complete)


def _seed_unit(dataset, cfg: ExperimentConfig, seed: int):
    # run_seed looked up when called (a test stands in for it)
    done = run_seed(dataset, cfg, seed)
    return done, done.pop("predictions"), done.pop("y_test")


def _write(cfg, dataset, per_seed, predictions, t0, *, complete: bool) -> dict[str, Any]:
    from . import report
    from .protocol import _compare, run_name

    results = {
        "config": dataclasses.asdict(cfg),
        "dataset": {
            "name": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "source": str(dataset.source),
            "sha256": dataset.file_sha256,
        },
        "versions": versions(),
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

    return {
        "val_fraction": VAL_FRACTION,
        "validation": "stratified per seed, held out from the encoder, the fields and "
        "the probes' fits; every choice made on it; test scored once",
        "tuned_Cs": list(DEFAULT_CS),
        "knn_grid": list(KNN_GRID),
        "knn_fixed": KNN_FIXED,
        "labels_per_class": list(LABELS_PER_CLASS),
        "blog_converged_max_iter": CONVERGED_MAX_ITER,
        "clip_factor": CLIP_FACTOR,
    }


# --------------------------------------------------------------------------- command line


def validate_config(cfg: ExperimentConfig) -> None:
    """Raises ConfigError (a ValueError naming the command-line option) for any bad setting;
    cheap, so run_experiment and main call it before loading data or training anything."""
    validate_common(cfg)
    for option, value in (
        ("--encoder-epochs", cfg.encoder_epochs),
        ("--field-epochs", cfg.field_epochs),
    ):
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(option, f"must be an integer >= 1, got {value!r}")
    if cfg.feature_dim is not None and (
        not _is_int(cfg.feature_dim) or not MIN_FEATURE_DIM <= cfg.feature_dim <= MAX_FEATURE_DIM
    ):
        raise ConfigError(
            "--feature-dim",
            f"must be an integer from {MIN_FEATURE_DIM} to "
            f"{MAX_FEATURE_DIM}, got {cfg.feature_dim!r}",
        )
    check_flag(cfg.pfgm_plateau, "--pfgm-plateau")
    for option, value in (("--no-sweep", cfg.sweep), ("--faithful", cfg.faithful)):
        check_flag(value, option)


def add_arguments(parser) -> None:
    add_common_arguments(
        parser, default_seeds=DEFAULT_SEEDS, what_is_cached="encoder features and learned fields"
    )
    parser.add_argument(
        "--encoder-epochs",
        type=int,
        default=None,
        help="encoder training epochs, >= 1 (default: 20, the blog's)",
    )
    parser.add_argument(
        "--field-epochs",
        type=int,
        default=None,
        help="learned-field training epochs, >= 1 (default: each preset's, 200)",
    )
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the horizon sweep (accuracy along the flow) and its plot",
    )
    parser.add_argument(
        "--feature-dim",
        type=int,
        default=None,
        help=f"size of the encoder's L2-normalised features (fc8), "
        f"{MIN_FEATURE_DIM}..{MAX_FEATURE_DIM} (default: 128, the blog's); "
        f"part of every cache key",
    )
    parser.add_argument(
        "--pfgm-plateau",
        action="store_true",
        help="also the row 'flow: PFGM preset, to plateau': the PFGM field "
        "trained until its validation loss plateaus (about 100 s of CPU "
        "a seed on digits, so not in the default run)",
    )
    parser.add_argument(
        "--faithful",
        action="store_true",
        help="the blog's code where it differs: N(0, 0.02) encoder init, raw "
        "[0, 1] pixels in a fixed order, mean field loss, unshuffled "
        "field batches (docs/BLOG_FAITHFULNESS.md)",
    )


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(
        **common_settings(args, study=""),
        encoder_epochs=args.encoder_epochs,
        field_epochs=args.field_epochs,
        sweep=not args.no_sweep,
        faithful=args.faithful,
        feature_dim=args.feature_dim,
        pfgm_plateau=args.pfgm_plateau,
    )


def main(args) -> int:
    """The `experiment` command. Bad settings raise ConfigError (a ValueError) before any
    work; the command line turns it into one line and exit code 2."""
    from . import report

    cfg = config_from_args(args)
    validate_config(cfg)
    write_command(Path(cfg.out_dir))
    results = run_experiment(cfg)
    print(report.markdown_table(results))
    print(
        f"\nwrote {Path(cfg.out_dir) / 'results.json'} and plots in {cfg.out_dir} "
        f"({results['seconds']:.0f} s)"
    )
    return 0
