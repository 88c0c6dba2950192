"""What both study drivers (experiment, ssl_experiment) share about their settings: the
ConfigError that names a command-line option, the checks of integers, folders and devices, and
the command.txt written beside a run's results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MIN_LIMIT",
    "ConfigError",
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
