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

Runs go through runner.py, the supervised experiment's runner: each finished objective x seed
(its record and per-image predictions) is stored under unit_key, so the same command run again
reads the finished ones back and continues with the next (--no-resume recomputes them, from the
encoders and rows cached on their own).

Outputs in --out: results.json (every seed's rows, the summary over seeds, paired tests against
the raw features, the s curve, epochs and wall times), results.md, alignment_uniformity.png
(Wang & Isola's plot: alignment against uniformity of the test features, each encoder raw and
after each post-process, coloured by tuned-probe accuracy), s_validation.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runner
from . import ssl as _ssl
from .augment import augmentation_for
from .config import ConfigError, _is_int, add_common_arguments, common_settings, validate_common
from .experiment import (
    RAW_ROW,
    Features,
    RunSettings,
    evaluate_rows,
    row_graph,
)
from .report import _jsonable
from .runner import Unit, run_study, versions
from .ssl_choices import (
    WEIGHTED,  # noqa: F401 (re-exported: the objectives whose uniformity weight is chosen)
    _fingerprint,
    _objective,
    _settings,
    validate_s,
    validate_weights,
)
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
    progress: bool | None = None  # None: progress bars when stderr is a terminal
    resume: bool = True  # reuse the results of encoders this configuration already finished

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

    validate_common(cfg)
    objs = tuple(cfg.objectives) if isinstance(cfg.objectives, (list, tuple)) else ()
    if not objs or any(o not in _ssl.OBJECTIVES for o in objs) or len(set(objs)) != len(objs):
        raise ConfigError(
            "--objectives",
            f"must be distinct names among {', '.join(_ssl.OBJECTIVES)}, got {cfg.objectives!r}",
        )
    for opt, v, lo in (
        ("--epochs", cfg.epochs, 1),
        ("--batch-size", cfg.batch_size, 2),
        ("--bank-size", cfg.bank_size, 0),
    ):
        if v is not None and (not _is_int(v) or v < lo):
            raise ConfigError(opt, f"must be an integer >= {lo}, got {v!r}")
    if cfg.riesz_s != "validate" and not _positive_number(cfg.riesz_s):
        raise ConfigError("--riesz-s", f"must be 'validate' or a number > 0, got {cfg.riesz_s!r}")
    if not _positive_number(cfg.riesz_weight):
        raise ConfigError("--riesz-weight", f"must be a number > 0, got {cfg.riesz_weight!r}")
    if cfg.validate_only and ("align_riesz" not in objs or cfg.riesz_s != "validate"):
        raise ConfigError(
            "--validate-only", "needs align_riesz among --objectives and --riesz-s validate"
        )
    wgrid = tuple(cfg.weight_grid) if isinstance(cfg.weight_grid, (list, tuple)) else None
    if wgrid is None or not all(_positive_number(w) for w in wgrid):
        raise ConfigError("--weight-grid", f"must be numbers > 0, got {cfg.weight_grid!r}")
    grid = tuple(cfg.s_grid) if isinstance(cfg.s_grid, (list, tuple)) else ()
    if not grid or not all(_positive_number(s) for s in grid):
        raise ConfigError("--s-grid", f"must be one or more numbers > 0, got {cfg.s_grid!r}")
    rows = tuple(cfg.rows) if isinstance(cfg.rows, (list, tuple)) else ()
    known = [n for n, _ in E.ROWS]
    if not rows or any(r not in known for r in rows):
        raise ConfigError("--rows", f"must be names among {known}, got {cfg.rows!r}")
    if RAW_ROW not in rows:
        raise ConfigError("--rows", f"must include {RAW_ROW!r} (the rows are compared with it)")


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


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
    t0, cpu0 = time.perf_counter(), time.process_time()
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
        # the process's CPU time for the encoder and its rows when they were computed (one
        # thread: what they take on an idle core, whatever else the machine was running)
        "cpu_seconds": time.process_time() - cpu0,
        "rows": rows,
    }
    return record, predictions


# --------------------------------------------------------------------------- the run
# The unit of this study's work is an objective's encoder on one seed, with its scored rows
# (runner.py runs the units, stores each finished one under unit_key and reads it back on
# resume). Bump SSL_UNIT_VERSION when a change here changes what a unit's record holds.
SSL_UNIT_VERSION = 1


def unit_key(cfg: SSLExperimentConfig, dataset, name: str, seed: int, s, weight) -> str:
    """Cache key of one objective x seed's results (runner.unit_key: the versions, the data
    and the shared settings) with the objective's, the training's and the rows' settings."""
    return runner.unit_key(
        cfg,
        dataset,
        seed,
        "ssl-encoder-result",
        {
            "ssl_unit_version": SSL_UNIT_VERSION,
            "ssl_version": _ssl.SSL_VERSION,
            "rows_cache_version": ROWS_CACHE_VERSION,
            "objective": _objective(cfg, name, s, weight).config(),
            "ssl_settings": _settings(cfg, seed).to_dict(),
            "augmentation": augmentation_for(dataset.name).config(),
            "rows": list(cfg.rows),
        },
    )


def run_ssl_experiment(cfg: SSLExperimentConfig, command: str = "") -> dict[str, Any]:
    """The choices on the validation split, then every objective x seed (runner.run_study:
    one thread by default, resume); the outputs written after each, partial until the last."""
    validate_config(cfg)
    return run_study(cfg.resolved(), SelfSupervisedStudy(command))


class SelfSupervisedStudy:
    """The self-supervised study as the runner's study: first the Riesz s and the uniformity
    weights chosen on seed 0's validation split, then a unit per seed and objective
    (run_encoder), written as results.json "per_encoder"."""

    def __init__(self, command: str = ""):
        self.command = command
        self.s_validation: dict[str, Any] | None = None
        self.s: float | None = None
        self.weight_validation: dict[str, Any] = {}
        self.validation_cpu_seconds = 0.0

    def units(self, cfg: SSLExperimentConfig, dataset, cache: Path) -> list[Unit]:
        cpu0 = time.process_time()
        if "align_riesz" in cfg.objectives:
            if cfg.riesz_s == "validate":
                print(
                    f"{dataset.name}: choosing the Riesz s on a validation split", file=sys.stderr
                )
                self.s_validation = validate_s(cfg, dataset, cache)
                self.s = self.s_validation["chosen_s"]
            else:
                self.s = float(cfg.riesz_s)
        if cfg.weight_grid:
            self.weight_validation = validate_weights(cfg, dataset, cache, self.s)
        # CPU time of this run's choices (encoders read from the cache cost next to nothing)
        self.validation_cpu_seconds = time.process_time() - cpu0
        weights = {name: v["chosen"] for name, v in self.weight_validation.items()}
        return [
            Unit(
                label=f"{name} seed {seed}",
                key=unit_key(cfg, dataset, name, seed, self.s, weights.get(name)),
                run=lambda name=name, seed=seed: _encoder_unit(
                    cfg, dataset, name, seed, self.s, cache, weights.get(name)
                ),
                meta={"what": "ssl-encoder-result", "objective": name, "seed": int(seed)},
            )
            for seed in (() if cfg.validate_only else cfg.seeds)
            for name in cfg.objectives
        ]

    def write(self, cfg, dataset, done, t0, *, complete: bool) -> dict[str, Any]:
        records = [d.record for d in done]
        predictions: dict[str, dict[int, Any]] = {}
        for d in done:
            predictions.setdefault(d.record["objective"], {})[int(d.record["seed"])] = (
                d.predictions,
                d.y_test,
            )
        return _write(self, cfg, dataset, records, predictions, t0, complete=complete)


def _encoder_unit(cfg, dataset, name, seed, s, cache, weight):
    rec, pred = run_encoder(cfg, dataset, name, seed, s, cache, weight)
    raw = rec["rows"][RAW_ROW]
    print(
        f"  {name} seed {seed}: raw tuned {raw['tuned']['test']:.3f}, train "
        f"{rec['train_seconds']:.0f} s (cached: {rec['encoder_from_cache']}), rows "
        f"{rec['rows_seconds']:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return rec, pred, np.asarray(dataset.y_test)


def _write(study, cfg, dataset, records, predictions, t0, *, complete: bool) -> dict[str, Any]:
    from .._io import atomic_write_text
    from . import report
    from .protocol import _compare

    paired, seed_aware = {}, {}
    if complete:
        for name, pred in predictions.items():
            paired[name] = report.paired_statistics(pred)
    for name, pred in predictions.items():  # every objective, as its seeds land
        seed_aware[name] = _compare(pred, None)
    results = {
        "config": dataclasses.asdict(cfg),
        "command": study.command,
        "dataset": {
            "name": dataset.name,
            "n_train": int(len(dataset.y_train)),
            "n_test": int(len(dataset.y_test)),
            "source": str(dataset.source),
        },
        "augmentation": augmentation_for(dataset.name).config(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "riesz_s": study.s,
        "s_validation": study.s_validation,
        "weight_validation": study.weight_validation,
        "per_encoder": records,
        "summary": summarise(records, cfg.rows),
        "paired": paired,
        "seed_aware": seed_aware,
        "riesz_vs_uniform": riesz_vs_uniform(records),
        "seconds": time.perf_counter() - t0,
        # CPU time: the encoders and their rows (each when it was computed) and this run's
        # choices on the validation split (near zero where its encoders came from the cache)
        "cpu_seconds": float(sum(r.get("cpu_seconds") or 0.0 for r in records)),
        "validation_cpu_seconds": study.validation_cpu_seconds,
        "complete": complete,
        "units_done": [[r["objective"], int(r["seed"])] for r in records],
        # the package sources that computed the units (more than one: a resumed run whose
        # code changed in between; each unit's own is per_encoder[i]["source_sha256"])
        "source_sha256": sorted({r.get("source_sha256") or "unknown" for r in records}),
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # per objective and seed every row's and probe's test predictions, from which the
    # seed-aware statistics are recomputed (reanalyse --check)
    report.write_predictions(predictions, out, groups=True)
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
    add_common_arguments(
        parser,
        default_seeds=(0, 1, 2),
        what_is_cached="encoder features, learned fields and scored rows",
    )
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=list(_ssl.OBJECTIVES),
        help=f"SSL objectives (default: all: {' '.join(_ssl.OBJECTIVES)})",
    )
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


def config_from_args(args) -> SSLExperimentConfig:
    return SSLExperimentConfig(
        **common_settings(args, study="ssl-"),
        objectives=tuple(args.objectives),
        epochs=args.epochs,
        batch_size=args.batch_size,
        riesz_s=args.riesz_s,
        s_grid=tuple(args.s_grid),
        bank_size=args.bank_size,
        riesz_weight=args.riesz_weight,
        weight_grid=tuple(args.weight_grid),
        validate_only=args.validate_only,
        rows=tuple(args.rows),
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
