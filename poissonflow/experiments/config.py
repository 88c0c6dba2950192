"""What both studies (experiment, ssl_experiment) share about their settings: the ConfigError
that names a command-line option, the checks of integers, folders and devices, the validation
and command-line options of the settings every study has, and the command.txt written beside
a run's results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MIN_LIMIT",
    "ConfigError",
    "add_common_arguments",
    "common_settings",
    "validate_common",
    "check_device",
    "check_readable",
    "check_writable_folder",
    "write_command",
]


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
        raise ConfigError("--device", f"must be 'cpu' or 'cuda[:index]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("--device", f"must be 'cpu' or 'cuda[:index]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device!r} was asked for but CUDA is not available")


def write_command(out_dir: Path) -> None:
    """command.txt beside the results: the command line that produces them (shared with
    ssl_experiment)."""
    import shlex

    from .._io import atomic_write_text

    argv = [a for a in sys.argv[1:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / "command.txt",
        "python -m poissonflow " + " ".join(shlex.quote(a) for a in argv) + "\n",
    )


# --------------------------------------------------------------------------- shared settings
# The settings every study has (dataset, seeds, folders, device, threads, --limit, progress,
# resume): validated and parsed here once, for experiment.py and ssl_experiment.py alike.


def check_flag(value, option: str, what: str = "must be True or False") -> None:
    if not isinstance(value, bool):
        raise ConfigError(option, f"{what}, got {value!r}")


def validate_common(cfg) -> None:
    """ConfigError (naming the option) for a bad shared setting of either study's
    configuration; cheap, so both run before loading data or training anything."""
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
    if cfg.progress is not None:
        check_flag(cfg.progress, "--progress", "must be True, False or None (a terminal's)")
    check_flag(cfg.resume, "--no-resume", "resume must be True or False")
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


def add_common_arguments(parser, *, default_seeds, what_is_cached: str) -> None:
    """The shared options of both study commands (their defaults differ only in seeds)."""
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
        default=list(default_seeds),
        help="non-negative seeds, one full run each (encoder, validation split, probes; "
        f"default: {' '.join(map(str, default_seeds))})",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for results.json, results.md and the plots "
        "(default: results/<study>-<dataset>, results/<dataset> for the experiment)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where {what_is_cached} are cached (default: <out>/cache)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device for the encoders and the learned fields: cpu (default) or cuda[:index]",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"use only the first N train and N/3 test examples, N >= {MIN_LIMIT} (quick runs)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bars",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch, BLAS and OpenMP threads for the run (default: 1; the "
        "studies' small problems run fastest on one thread a process)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="recompute units of work (a seed; an objective's seed) that this "
        "configuration already finished (default: their stored results are "
        "reused, so a stopped run resumes where it stopped; encoders and "
        "learned fields are cached either way)",
    )


def common_settings(args, study: str) -> dict:
    """The shared settings from parsed arguments, as keyword arguments of a study's
    configuration (`study` names the default output folder: results/<study><dataset>)."""
    return {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "seeds": tuple(args.seeds),
        "out_dir": args.out or f"results/{study}{args.dataset}",
        "cache_dir": args.cache_dir,
        "device": args.device,
        "limit": args.limit,
        "progress": args.progress,
        "threads": args.threads,
        "resume": not args.no_resume,
    }
