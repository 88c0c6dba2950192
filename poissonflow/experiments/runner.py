"""One runner for both studies: the supervised experiment (experiment.py, a unit of work per
seed) and the self-supervised one (ssl_experiment.py, a unit per objective and seed).

A study says what its units are and how its results are written; the runner does the rest,
once for both: the thread limits, loading the data (cut by --limit), the loop over the units
with resume (a finished unit's record and per-image predictions are stored in the cache folder
under a key of everything that determines them, so a stopped run, or a longer list of seeds,
continues at the next unfinished unit), results written after every unit (marked partial until
the last), the package versions and the fingerprint of the sources that computed each unit.
Within a unit the encoders' features and the learned fields are cached on their own (a unit
stopped half-way recomputes only what it had not stored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "Unit",
    "Done",
    "Study",
    "run_study",
    "load_limited",
    "cache_dir",
    "unit_key",
    "versions",
    "source_sha256",
]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of a study's work. `run()` returns (record, predictions, y_test): the unit's
    JSON-able record, its per-image test predictions {row: {probe: labels}} and the test
    labels."""

    label: str  # in messages: "seed 3", "infonce seed 2"
    key: str  # cache key of its finished results (everything that determines them)
    run: Callable[[], tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], np.ndarray]]
    meta: dict[str, Any]  # stored beside them (what, seed, ...)


@dataclasses.dataclass
class Done:
    """A finished unit: computed now (record["resumed"] False) or read back (True)."""

    unit: Unit
    record: dict[str, Any]
    predictions: dict[str, dict[str, np.ndarray]]
    y_test: np.ndarray


class Study(Protocol):
    def units(self, cfg, dataset, cache: Path) -> list[Unit]:
        """The units, in order; any work that comes before them (the self-supervised study's
        choices on its validation split) is done here."""

    def write(self, cfg, dataset, done: list[Done], t0: float, *, complete: bool) -> dict:
        """Writes results.json and its renderings from the units done so far; returns the
        results."""


def run_study(cfg, study: Study) -> dict[str, Any]:
    """Runs a study's units with resume and writes its results after each (partial) and at
    the end (complete). cfg: an already validated configuration with the shared settings
    (config.validate_common). The problems are small (a 1347 x 129 logistic regression, a
    129-wide MLP): with two threads on two shared cores the OpenMP and BLAS workers spin
    against each other, and one seed's rows took 17 minutes at a load of 9 where one thread
    took 30 s for the whole seed (measured on the development machine), so the run limits
    torch, BLAS and OpenMP to `cfg.threads`."""
    if cfg.progress is None:
        cfg = dataclasses.replace(cfg, progress=sys.stderr.isatty())
    if cfg.threads is None:
        return _run(cfg, study)
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with threadpool_limits(limits=cfg.threads):
            return _run(cfg, study)
    finally:
        torch.set_num_threads(before)


def _run(cfg, study: Study) -> dict[str, Any]:
    from .cache import ArrayCache

    t0 = time.perf_counter()
    dataset = load_limited(cfg.dataset, cfg.data_dir, cfg.limit)
    folder = cache_dir(cfg)
    store = ArrayCache(folder)
    units = study.units(cfg, dataset, folder)
    source = source_sha256()
    done: list[Done] = []
    for i, unit in enumerate(units):
        found = _load(store, unit.key) if cfg.resume else None
        if found is not None:
            record, predictions, y_test = found
            record["resumed"] = True
            print(
                f"{dataset.name}: {unit.label} finished before, its results read from "
                f"{store.path(unit.key)}",
                file=sys.stderr,
            )
        else:
            print(f"{dataset.name}: {unit.label}", file=sys.stderr, flush=True)
            record, predictions, y_test = unit.run()
            record["source_sha256"] = source
            _store(store, unit, record, predictions, y_test)
            record["resumed"] = False
        done.append(Done(unit, record, predictions, np.asarray(y_test)))
        if i < len(units) - 1:
            # the units so far, marked partial: a long run that is stopped keeps them
            study.write(cfg, dataset, done, t0, complete=False)
    return study.write(cfg, dataset, done, t0, complete=True)


# ------------------------------------------------------------------ finished units, stored


def _store(store, unit: Unit, record: dict[str, Any], predictions, y_test) -> None:
    from ..files import jsonable

    index, arrays = [], {"y_test": np.asarray(y_test)}
    for row, probes in predictions.items():
        for probe, pred in probes.items():
            name = f"p{len(index)}"
            index.append([row, probe, name])
            arrays[name] = np.asarray(pred)
    stored = {"result": jsonable(record), "predictions": index}
    arrays["record_json"] = np.array(json.dumps(stored))
    store.put(unit.key, arrays, unit.meta)


def _load(store, key: str):
    """(record, predictions, y_test) of a finished unit, or None."""
    found = store.get(key)
    if found is None:
        return None
    arrays, _ = found
    try:
        stored = json.loads(str(arrays["record_json"][()]))
        predictions: dict[str, dict[str, np.ndarray]] = {}
        for row, probe, name in stored["predictions"]:
            predictions.setdefault(row, {})[probe] = arrays[name]
        return stored["result"], predictions, arrays["y_test"]
    except (KeyError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------ what both studies record


def unit_key(cfg, dataset, seed: int, what: str, settings: dict[str, Any]) -> str:
    """Cache key of one unit's results: what both studies' results depend on (the code and
    library versions, the data set and its fingerprint after --limit, the seed, device, threads
    and the validation split's size) and the study's own `settings`. Display options
    (progress, output folders) are not part of it."""
    from .. import __version__
    from .cache import cache_key
    from .encoder import ENCODER_VERSION
    from .protocol import VAL_FRACTION
    from .rows import LEARNED_FIELD_CACHE_VERSION

    return cache_key(
        {
            "what": what,
            "encoder_version": ENCODER_VERSION,
            "learned_field_cache_version": LEARNED_FIELD_CACHE_VERSION,
            "poissonflow": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "sklearn": sklearn_version(),
            "dataset": dataset.name,
            "seed": int(seed),
            "device": torch.device(cfg.device).type,
            "threads": cfg.threads,
            "val_fraction": VAL_FRACTION,
            **settings,
        },
        dataset.fingerprint(),
    )


def cache_dir(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"


def load_limited(name: str, data_dir, limit):
    """The data set, cut to its first `limit` train and limit / 3 test examples (--limit)."""
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


def sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def versions() -> dict[str, str]:
    """The versions results.json records (and, where they change results, cache keys hold)."""
    from .. import __version__

    return {
        "poissonflow": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "sklearn": sklearn_version(),
        "platform": platform.platform(),
    }


def source_sha256() -> str:
    """sha256 of the study's Python sources (recorded with each unit, not part of its key: a
    resumed run reports when its units were computed by different sources)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
