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
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import (
    MIN_LIMIT,
    ConfigError,
    _is_int,
    check_device,
    check_readable,
    check_writable_folder,
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
        cache_dir=_cache_dir(cfg),
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
        cache_dir=_cache_dir(cfg),
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
        {
            "what": "experiment-seed",
            "seed_result_version": SEED_RESULT_VERSION,
            "encoder_version": ENCODER_VERSION,
            "learned_field_cache_version": LEARNED_FIELD_CACHE_VERSION,
            "poissonflow": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "sklearn": _sklearn_version(),
            "dataset": dataset.name,
            "seed": int(seed),
            "encoder_settings": encoder_settings(cfg, dataset.name, seed).to_dict(),
            "field_epochs": cfg.field_epochs,
            "faithful": cfg.faithful,
            "sweep": cfg.sweep,
            "device": torch.device(cfg.device).type,
            "threads": cfg.threads,
            "rows": row_names(cfg.pfgm_plateau),
            "plateau": PLATEAU,
            "val_fraction": VAL_FRACTION,
            "clip_factor": CLIP_FACTOR,
        },
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
    (measured on the development machine), so the run limits torch, BLAS and OpenMP to
    `cfg.threads`."""
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
            dataset,
            x_train=dataset.x_train[:limit],
            y_train=dataset.y_train[:limit],
            x_test=dataset.x_test[:n_test],
            y_test=dataset.y_test[:n_test],
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
            print(
                f"{dataset.name}: seed {seed} finished before, its results read from "
                f"{cache.path(key)}",
                file=sys.stderr,
            )
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
        "dataset": {
            "name": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "source": str(dataset.source),
            "sha256": dataset.file_sha256,
        },
        "versions": {
            "poissonflow": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "sklearn": _sklearn_version(),
            "platform": platform.platform(),
        },
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


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


# --------------------------------------------------------------------------- command line


def validate_config(cfg: ExperimentConfig) -> None:
    """Raises ConfigError (a ValueError naming the command-line option) for any bad setting;
    cheap, so run_experiment and main call it before loading data or training anything."""
    from .data import DATASETS, find_cifar10_subset

    if cfg.dataset not in DATASETS:
        raise ConfigError("--dataset", f"must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
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
        raise ConfigError(
            "--limit",
            f"must be an integer >= {MIN_LIMIT} (enough examples for "
            f"the probe's validation split), got {cfg.limit!r}",
        )
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
    if not isinstance(cfg.resume, bool):
        raise ConfigError("--no-resume", f"resume must be True or False, got {cfg.resume!r}")
    if not isinstance(cfg.pfgm_plateau, bool):
        raise ConfigError("--pfgm-plateau", f"must be True or False, got {cfg.pfgm_plateau!r}")
    check_device(cfg.device)
    if cfg.data_dir is not None:
        if cfg.dataset == "digits":
            raise ConfigError(
                "--data-dir",
                "digits are bundled with scikit-learn and read no "
                "folder; drop --data-dir or choose another --dataset",
            )
        check_readable(
            Path(cfg.data_dir).expanduser(),
            "--data-dir",
            "the CIFAR-10 folder" if cfg.dataset == "cifar10" else "the subset file",
        )
    elif cfg.dataset == "cifar10":
        raise ConfigError(
            "--data-dir",
            "--dataset cifar10 needs --data-dir: the official "
            "'cifar-10-batches-py' folder or the folder holding it",
        )
    elif cfg.dataset == "cifar10-subset" and find_cifar10_subset(None) is None:
        raise ConfigError(
            "--data-dir",
            "--dataset cifar10-subset found no shared copy at its "
            "default location; pass --data-dir (the .npz or its "
            "folder)",
        )
    check_writable_folder(Path(cfg.out_dir), "--out")
    if cfg.cache_dir is not None:
        check_writable_folder(Path(cfg.cache_dir), "--cache-dir")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "cifar10", "cifar10-subset"],
        help="digits: scikit-learn's bundled 8x8 digits (default); cifar10: the "
        "official batches (needs --data-dir); cifar10-subset: the shared "
        "5085/1017-image subset, or --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="cifar-10-batches-py folder (cifar10) or the subset .npz / folder "
        "(cifar10-subset); not allowed with digits",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="non-negative seeds, one full run each (encoder, probe split, flow; "
        "default: 0 1 2 3 4)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for results.json, results.md and the plot (default: results/<dataset>)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where encoder features and learned fields are cached (default: <out>/cache)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device for the encoder and the learned fields: cpu (default) or cuda[:index]",
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
        "--limit",
        type=int,
        default=None,
        help=f"use only the first N train and N/3 test examples, N >= {MIN_LIMIT} (quick runs)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (default: bars when stderr is a terminal)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch, BLAS and OpenMP threads for the run (default: 1; the "
        "experiment's small problems run fastest on one thread a process)",
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
        "--no-resume",
        action="store_true",
        help="recompute seeds that this configuration already finished "
        "(default: their stored results are reused, so a stopped run "
        "resumes at the next seed; encoder features and learned fields "
        "are cached either way)",
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
        dataset=args.dataset,
        data_dir=args.data_dir,
        seeds=tuple(args.seeds),
        out_dir=args.out or f"results/{args.dataset}",
        cache_dir=args.cache_dir,
        device=args.device,
        encoder_epochs=args.encoder_epochs,
        field_epochs=args.field_epochs,
        sweep=not args.no_sweep,
        limit=args.limit,
        progress=False if args.no_progress else None,
        faithful=args.faithful,
        threads=args.threads,
        feature_dim=args.feature_dim,
        resume=not args.no_resume,
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
