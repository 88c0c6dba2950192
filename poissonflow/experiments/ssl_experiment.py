"""The self-supervised encoders in the experiment:

    python -m poissonflow ssl-experiment --out docs/results/ssl-digits            # digits
    python -m poissonflow ssl-experiment --dataset cifar10-subset \\
        --objectives infonce align_uniform align_riesz --seeds 0 --riesz-s 2 \\
        --out docs/results/ssl-cifar10-subset

Per objective of `poissonflow.experiments.ssl` and seed: train SmallAlexNet without labels on two augmented
views (`poissonflow.experiments.augment`; features cached per objective x seed, so a killed run resumes),
then score the post-hoc rows of the supervised experiment (raw, centred L2, ZCA, the blog flow,
the PFGM flow, the exact flow) with its probes (blog LR, tuned linear, cosine k-NN, 1% / 10%
labels) through `experiment.row_graph` / `experiment.evaluate_rows` (imported, not copied; the
learned fields are cached by the experiment's own keys). Scored rows are cached too.

Before the runs, when align_riesz is among the objectives and --riesz-s is "validate" (the
default), the Riesz exponent s is chosen on digits-style validation: the train set is split
80 / 20 (stratified, seed 0), one encoder per s in --s-grid is trained on the 80% (seed 0), and
the s whose features give the best tuned-probe accuracy on the 20% wins (ties: the smaller s).
Wang & Isola's align_uniform is trained on the same split as the reference. The test set is
not looked at. The curve goes into results.json / results.md / s_validation.png.

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
from .experiment import (RAW_ROW, ConfigError, Features, RunSettings, evaluate_rows,
                         representation_metrics, row_graph)

__all__ = ["SSLExperimentConfig", "validate_config", "run_ssl_experiment", "add_arguments",
           "config_from_args", "main", "DEFAULT_ROWS", "S_GRID", "EPOCHS", "validate_s",
           "rerender"]

DEFAULT_ROWS = ("raw features", "L2 (centred)", "ZCA whitening", "flow: blog preset",
                "flow: PFGM preset", "flow: exact field")
S_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Epoch budgets and batch sizes per data set: digits, 30 epochs of batch 128 (11 steps an
# epoch, about 0.7 s an epoch on one thread) keep 6 objectives x 3 seeds plus the s sweep and
# every row well under 30 minutes on the shared 2-core machine. CIFAR subset: see poissonflow/experiments/README.md.
EPOCHS = {"digits": 30, "cifar10-subset": 15, "cifar10": 15}
BATCH = {"digits": 128, "cifar10-subset": 256, "cifar10": 256}
BANK = {"digits": 1024, "cifar10-subset": 4096, "cifar10": 4096}
# Part of the scored rows' cache key: bump when the scoring of rows changes.
# 2: the probes scale with one StandardScaler fit on all training features (probes.py).
ROWS_CACHE_VERSION = 2
PROBE_KEYS = ("blog", "tuned", "knn20", "knn200", "labels1%", "labels10%")


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
    riesz_weight: float = 1.0  # align_riesz's uniform_weight (Wang & Isola's 1 / 1 weights)
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
            self, epochs=self.epochs or EPOCHS[self.dataset],
            batch_size=self.batch_size or BATCH[self.dataset],
            bank_size=self.bank_size if self.bank_size is not None else BANK[self.dataset])


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate_config(cfg: SSLExperimentConfig) -> None:
    """ConfigError (a ValueError naming the option) for any bad setting, before any work."""
    from . import experiment as E
    from .data import DATASETS, find_cifar10_subset

    if cfg.dataset not in DATASETS:
        raise ConfigError("--dataset", f"must be one of {', '.join(DATASETS)}, got "
                                       f"{cfg.dataset!r}")
    objs = tuple(cfg.objectives) if isinstance(cfg.objectives, (list, tuple)) else ()
    if not objs or any(o not in _ssl.OBJECTIVES for o in objs) or len(set(objs)) != len(objs):
        raise ConfigError("--objectives", f"must be distinct names among "
                                          f"{', '.join(_ssl.OBJECTIVES)}, got {cfg.objectives!r}")
    seeds = tuple(cfg.seeds) if isinstance(cfg.seeds, (list, tuple)) else ()
    if not seeds or any(not _is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", f"must be distinct non-negative integers, got {cfg.seeds!r}")
    for opt, v, lo in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 2),
                       ("--bank-size", cfg.bank_size, 0)):
        if v is not None and (not _is_int(v) or v < lo):
            raise ConfigError(opt, f"must be an integer >= {lo}, got {v!r}")
    if cfg.threads is not None and (not _is_int(cfg.threads) or cfg.threads < 1):
        raise ConfigError("--threads", f"must be an integer >= 1, got {cfg.threads!r}")
    if cfg.limit is not None and (not _is_int(cfg.limit) or cfg.limit < E.MIN_LIMIT):
        raise ConfigError("--limit", f"must be an integer >= {E.MIN_LIMIT}, got {cfg.limit!r}")
    if cfg.riesz_s != "validate":
        if isinstance(cfg.riesz_s, bool) or not isinstance(cfg.riesz_s, (int, float)) or \
                not math.isfinite(cfg.riesz_s) or cfg.riesz_s <= 0:
            raise ConfigError("--riesz-s", f"must be 'validate' or a number > 0, got "
                                           f"{cfg.riesz_s!r}")
    if isinstance(cfg.riesz_weight, bool) or not isinstance(cfg.riesz_weight, (int, float)) or \
            not math.isfinite(cfg.riesz_weight) or cfg.riesz_weight <= 0:
        raise ConfigError("--riesz-weight", f"must be a number > 0, got {cfg.riesz_weight!r}")
    if cfg.validate_only and ("align_riesz" not in objs or cfg.riesz_s != "validate"):
        raise ConfigError("--validate-only", "needs align_riesz among --objectives and "
                                             "--riesz-s validate")
    grid = tuple(cfg.s_grid) if isinstance(cfg.s_grid, (list, tuple)) else ()
    if not grid or any(isinstance(s, bool) or not isinstance(s, (int, float)) or
                       not math.isfinite(s) or s <= 0 for s in grid):
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
            raise ConfigError("--data-dir", "digits are bundled with scikit-learn; drop "
                                            "--data-dir or choose another --dataset")
        E.check_readable(Path(cfg.data_dir).expanduser(), "--data-dir", "the data")
    elif cfg.dataset == "cifar10":
        raise ConfigError("--data-dir", "--dataset cifar10 needs --data-dir")
    elif cfg.dataset == "cifar10-subset" and find_cifar10_subset(None) is None:
        raise ConfigError("--data-dir", "--dataset cifar10-subset found no shared copy; pass "
                                        "--data-dir")
    E.check_writable_folder(Path(cfg.out_dir), "--out")
    if cfg.cache_dir is not None:
        E.check_writable_folder(Path(cfg.cache_dir), "--cache-dir")


# --------------------------------------------------------------------------- pieces


def _settings(cfg: SSLExperimentConfig, seed: int) -> _ssl.SSLSettings:
    return _ssl.SSLSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                            arch="digits" if cfg.dataset == "digits" else "blog")


def _objective(cfg: SSLExperimentConfig, name: str, s: float | None):
    if name == "align_riesz":
        return _ssl.make_objective(name, s=float(s), bank_size=cfg.bank_size,
                                   uniform_weight=float(cfg.riesz_weight))
    return _ssl.make_objective(name)


def _fingerprint(*arrays) -> str:
    from .cache import arrays_sha256

    return arrays_sha256({f"a{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)})


def validate_s(cfg: SSLExperimentConfig, dataset, cache: Path) -> dict[str, Any]:
    """The s curve on a stratified 80/20 split of the train set (seed 0; module docstring)."""
    from sklearn.model_selection import train_test_split

    from .probes import knn_predict, linear_probe

    idx = np.arange(len(dataset.y_train))
    fit_i, val_i = train_test_split(idx, test_size=0.2, stratify=dataset.y_train, random_state=0)
    xf, xv = dataset.x_train[fit_i], dataset.x_train[val_i]
    yf, yv = dataset.y_train[fit_i], dataset.y_train[val_i]
    fp = _fingerprint(xf, xv)
    aug = augmentation_for(dataset.name)

    def point(objective, label):
        t0 = time.perf_counter()
        enc = _ssl.encode_ssl(xf, xv, fp, objective, aug, _settings(cfg, 0), device=cfg.device,
                              cache_dir=cache, progress=cfg.progress)
        tuned = linear_probe(enc.features_train, yf, enc.features_test, yv, seed=0)
        knn = knn_predict(enc.features_train, yf, enc.features_test, k=20)
        m = representation_metrics(enc.features_test, enc.views_test)
        p = {"val_tuned": tuned.test_accuracy, "val_knn20": float((knn == yv).mean()), **m,
             "train_seconds": enc.train_seconds, "from_cache": enc.from_cache,
             "seconds": time.perf_counter() - t0}
        print(f"  s-validation: {label} val tuned {tuned.test_accuracy:.3f} knn20 "
              f"{p['val_knn20']:.3f} ({p['seconds']:.0f} s)", file=sys.stderr, flush=True)
        return p

    points = [{"s": float(s), **point(_objective(cfg, "align_riesz", s), f"s={s:g}")}
              for s in cfg.s_grid]
    best = max(p["val_tuned"] for p in points)
    chosen = min(p["s"] for p in points if p["val_tuned"] == best)
    return {"n_fit": int(len(fit_i)), "n_val": int(len(val_i)), "seed": 0, "points": points,
            "chosen_s": chosen, "criterion": "tuned linear probe accuracy on the validation "
                                             "split (ties: the smaller s)",
            # Wang & Isola's objective on the same split, same seed: the bar to meet
            "reference_align_uniform": point(_objective(cfg, "align_uniform", None),
                                             "align_uniform")}


def _row_cache_key(features_key: str, rows, seed: int) -> str:
    from .. import __version__
    from .cache import cache_key
    from .experiment import LEARNED_FIELD_CACHE_VERSION

    return cache_key({"what": "ssl-rows", "version": ROWS_CACHE_VERSION, "rows": list(rows),
                      "seed": seed, "poissonflow": __version__,
                      "learned_field_cache_version": LEARNED_FIELD_CACHE_VERSION},
                     features_key)


def run_encoder(cfg: SSLExperimentConfig, dataset, name: str, seed: int, s, cache: Path):
    """One objective x seed: features (cached) and the scored rows (cached). Returns the
    per-seed record and the per-image predictions {row: {probe: labels}}."""
    from .cache import ArrayCache

    objective = _objective(cfg, name, s)
    t0 = time.perf_counter()
    enc = _ssl.encode_ssl(dataset.x_train, dataset.x_test, dataset.fingerprint(), objective,
                          augmentation_for(dataset.name), _settings(cfg, seed),
                          device=cfg.device, cache_dir=cache, progress=cfg.progress)
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
        features = Features(enc.features_train, enc.features_test, tuple(enc.views_test))
        run = RunSettings(seed=seed, device=cfg.device, progress=False, cache_dir=cache)
        graph = row_graph(features, (dataset.y_train, dataset.y_test), run)
        rows = evaluate_rows(graph, cfg.rows)
        predictions = {r: rows[r].pop("_predictions") for r in rows}
        rows = json.loads(json.dumps(rows, default=_jsonable))
        store.put(rkey, {f"{r}|{p}": np.asarray(v) for r, d in predictions.items()
                         for p, v in d.items()}, rows)
        rows_from_cache = False
    record = {
        "objective": name, "seed": seed, "objective_settings": objective.config(),
        "ssl_settings": _settings(cfg, seed).to_dict(),
        "augmentation": augmentation_for(dataset.name).config(),
        "epochs": cfg.epochs, "epoch_loss": enc.history.epoch_loss,
        "train_seconds": enc.train_seconds, "encoder_from_cache": enc.from_cache,
        "rows_from_cache": rows_from_cache, "rows_seconds": time.perf_counter() - t1,
        "encode_seconds_this_run": encode_seconds, "rows": rows,
    }
    return record, predictions


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- summary


def _stats(values):
    vals = [float(v) for v in values if v is not None and not
            (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    a = np.asarray(vals)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def summarise(records: list[dict], rows) -> dict[str, Any]:
    """{objective: {row: {probe or metric: stats over seeds, "delta <probe>": stats of the
    per-seed difference to the raw row}}, "_best": ...}."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["objective"] for r in records):
        recs = [r for r in records if r["objective"] == name]
        entry: dict[str, Any] = {}
        for row in rows:
            e: dict[str, Any] = {}
            for p in PROBE_KEYS:
                e[p] = _stats([r["rows"][row][p]["test"] for r in recs])
                e[f"delta {p}"] = _stats([r["rows"][row][p]["test"] -
                                          r["rows"][RAW_ROW][p]["test"] for r in recs])
            for m in ("alignment", "uniform_loss", "wasserstein_uniformity", "effective_rank"):
                e[m] = _stats([r["rows"][row]["metrics"].get(m) for r in recs])
            entry[row] = e
        best = max(((row, p) for row in rows for p in ("blog", "tuned", "knn20")),
                   key=lambda rp: entry[rp[0]][rp[1]]["mean"])
        entry["_best"] = {"row": best[0], "probe": best[1], **entry[best[0]][best[1]]}
        entry["_train_seconds"] = _stats([r["train_seconds"] for r in recs])
        entry["_rows_seconds"] = _stats([r["rows"][row]["seconds"] for r in recs
                                         for row in rows])
        out[name] = entry
    return out


def _pct(st, signed=False):
    if st is None:
        return "–"
    sign = "+" if signed else ""
    return f"{100 * st['mean']:{sign}.1f} ± {100 * st['std']:.1f}"


def _num(st):
    return "–" if st is None else f"{st['mean']:.3f} ± {st['std']:.3f}"


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    summ = results["summary"]
    rows = cfg["rows"]
    n_seeds = len(cfg["seeds"])
    if cfg.get("validate_only"):
        lines = [f"# align + Riesz: s validation only, {results['dataset']['name']}", "",
                 f"{cfg['epochs']} epochs of batch {cfg['batch_size']}, Adam lr 1e-3, seed 0; "
                 f"augmentation {results['augmentation']}. Command: `{results['command']}`.", ""]
        sv = results.get("s_validation")
        lines += [f"Uniformity weight {cfg.get('riesz_weight', 1.0):g}, bank {cfg['bank_size']}; "
                  f"{sv['n_fit']} images to train, {sv['n_val']} to validate; best s = "
                  f"**{sv['chosen_s']:g}**.", "",
                  "| s | val tuned | val k-NN 20 | alignment | uniform_loss | W2 |",
                  "|---|---|---|---|---|---|"]
        for p in sv["points"] + [dict(sv["reference_align_uniform"], s="align_uniform")]:
            s = p["s"] if isinstance(p["s"], str) else f"{p['s']:g}"
            lines.append(f"| {s} | {100 * p['val_tuned']:.1f} | {100 * p['val_knn20']:.1f} | "
                         f"{p['alignment']:.3f} | {p['uniform_loss']:.3f} | "
                         f"{p['wasserstein_uniformity']:.3f} |")
        return "\n".join(lines + [""])
    lines = [f"# Self-supervised encoders on {results['dataset']['name']}", "",
             f"{results['dataset']['n_train']} train / {results['dataset']['n_test']} test "
             f"images; SmallAlexNet ({'digits' if cfg['dataset'] == 'digits' else 'blog'} "
             f"widths), {cfg['epochs']} epochs of batch {cfg['batch_size']}, Adam lr 1e-3, "
             f"seeds {cfg['seeds']}; augmentation {results['augmentation']}. "
             f"Accuracies in % (mean ± standard deviation over the {n_seeds} seeds); "
             f"metrics on the L2-normalised test features (alignment on two augmented views "
             f"of each test image). Command: `{results['command']}`.",
             "" if results["complete"] else "\n**Incomplete: the run is still going or was "
                                              "stopped; the seeds done so far.**", ""]
    sv = results.get("s_validation")
    if sv:
        lines += ["## Riesz exponent s, chosen on a validation split", "",
                  f"align + Riesz (uniformity weight {cfg.get('riesz_weight', 1.0):g}, bank "
                  f"{cfg['bank_size']}), seed 0, trained on {sv['n_fit']} train images, "
                  f"probed on the "
                  f"other {sv['n_val']} (test set unused); chosen s = **{sv['chosen_s']:g}** "
                  f"({sv['criterion']}).", "",
                  "| s | val tuned | val k-NN 20 | alignment | uniform_loss | W2 |",
                  "|---|---|---|---|---|---|"]
        for p in sv["points"]:
            lines.append(f"| {p['s']:g} | {100 * p['val_tuned']:.1f} | {100 * p['val_knn20']:.1f}"
                         f" | {p['alignment']:.3f} | {p['uniform_loss']:.3f} | "
                         f"{p['wasserstein_uniformity']:.3f} |")
        ref = sv.get("reference_align_uniform")
        if ref:
            lines.append(f"| align_uniform (reference) | {100 * ref['val_tuned']:.1f} | "
                         f"{100 * ref['val_knn20']:.1f} | {ref['alignment']:.3f} | "
                         f"{ref['uniform_loss']:.3f} | {ref['wasserstein_uniformity']:.3f} |")
        lines.append("")
    elif results.get("riesz_s") is not None:
        lines += [f"Riesz exponent s = {results['riesz_s']:g} (given).", ""]
    lines += ["## Best probe accuracy per encoder", "",
              "Best (row, probe) by mean over seeds among blog LR, tuned and k-NN 20; the raw "
              "features' tuned probe beside it; training wall time per encoder (one thread).", "",
              "| encoder | best row | probe | accuracy | raw, tuned | raw alignment | "
              "raw uniform_loss | raw W2 | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in summ.items():
        b, raw = e["_best"], e[RAW_ROW]
        lines.append(f"| {name} | {b['row']} | {b['probe']} | {_pct(b)} | {_pct(raw['tuned'])}"
                     f" | {_num(raw['alignment'])} | {_num(raw['uniform_loss'])} | "
                     f"{_num(raw['wasserstein_uniformity'])} | "
                     f"{e['_train_seconds']['mean']:.0f} |")
    lines += ["", "## Every row", "",
              "Test accuracy of each probe; in brackets the mean per-seed difference to the "
              "raw features (points).", ""]
    head = "| encoder | row | blog LR | tuned | k-NN 20 | 1% labels | alignment | uniform_loss " \
           "| W2 |"
    lines += [head, "|" + "---|" * 9]
    for name, e in summ.items():
        for row in rows:
            r = e[row]
            cells = []
            for p in ("blog", "tuned", "knn20", "labels1%"):
                d = "" if row == RAW_ROW else f" ({100 * r['delta ' + p]['mean']:+.1f})"
                cells.append(_pct(r[p]) + d)
            lines.append(f"| {name} | {row} | " + " | ".join(cells) +
                         f" | {_num(r['alignment'])} | {_num(r['uniform_loss'])} | "
                         f"{_num(r['wasserstein_uniformity'])} |")
    paired = results.get("paired", {})
    if paired:
        lines += ["", "## Paired against the raw features (pooled over seeds)", "",
                  "Difference in points, bootstrap 95% interval, exact McNemar p "
                  "(`probes.paired_comparison`).", "",
                  "| encoder | row | tuned | blog LR | k-NN 20 |", "|---|---|---|---|---|"]
        for name, pr in paired.items():
            for row in rows[1:]:
                cells = []
                for p in ("tuned", "blog", "knn20"):
                    c = pr.get("against_raw", {}).get(p, {}).get(row, {}).get("pooled")
                    cells.append("–" if c is None else _cmp(c))
                lines.append(f"| {name} | {row} | " + " | ".join(cells) + " |")
    ar = results.get("riesz_vs_uniform")
    if ar:
        lines += ["", "## align + Riesz against align + uniform (Wang & Isola)", "", ar["text"]]
    lines += ["", f"Wall time of this invocation: {results['seconds']:.0f} s "
                  f"(cached encoders and rows are not retrained).", ""]
    return "\n".join(lines)


def _cmp(c) -> str:
    from .report import comparison_cell

    return comparison_cell(c)


def riesz_vs_uniform(records) -> dict[str, Any] | None:
    """Per seed (same seed, same augmentation draws) raw-feature differences align_riesz minus
    align_uniform under each probe."""
    by = {(r["objective"], r["seed"]): r for r in records}
    seeds = sorted(s for (o, s) in by if o == "align_riesz" and ("align_uniform", s) in by)
    if not seeds:
        return None
    out = {"seeds": seeds}
    parts = []
    for p in ("tuned", "blog", "knn20", "labels1%"):
        diffs = [by[("align_riesz", s)]["rows"][RAW_ROW][p]["test"] -
                 by[("align_uniform", s)]["rows"][RAW_ROW][p]["test"] for s in seeds]
        st = _stats(diffs)
        out[p] = {"per_seed": diffs, **st}
        parts.append(f"{p}: {100 * st['mean']:+.1f} ± {100 * st['std']:.1f} "
                     f"(per seed {', '.join(f'{100 * d:+.1f}' for d in diffs)})")
    out["text"] = ("Raw features, align_riesz minus align_uniform, points, mean ± std over "
                   f"seeds {seeds}: " + "; ".join(parts) + ".")
    return out


def plot(results: dict[str, Any], out_dir: Path) -> None:
    from .report import pyplot, save_png

    plt = pyplot()
    summ = results["summary"]
    rows = results["config"]["rows"]
    cs = [100 * e[row]["tuned"]["mean"] for e in summ.values() for row in rows]
    if cs:
        _plot_alignment_uniformity(plt, save_png, results, summ, rows, out_dir, min(cs),
                                   max(cs))
    _plot_s_curve(plt, save_png, results.get("s_validation"), out_dir)


def _plot_alignment_uniformity(plt, save_png, results, summ, rows, out_dir, lo, hi):
    markers = dict(zip(rows, "o^sDvP*X"))
    fig, ax = plt.subplots(figsize=(8.5, 6))
    sc = None
    for name, e in summ.items():  # a faint line from each encoder's raw point to its rows
        raw = e[RAW_ROW]
        for row in rows[1:]:
            r = e[row]
            if raw["alignment"] is not None and r["alignment"] is not None:
                ax.plot([raw["uniform_loss"]["mean"], r["uniform_loss"]["mean"]],
                        [raw["alignment"]["mean"], r["alignment"]["mean"]], color="0.8",
                        lw=0.6, zorder=0)
    for name, e in summ.items():
        for row in rows:
            r = e[row]
            if r["alignment"] is None:
                continue
            sc = ax.scatter([r["uniform_loss"]["mean"]], [r["alignment"]["mean"]],
                            c=[100 * r["tuned"]["mean"]], marker=markers[row], s=70,
                            cmap="viridis", vmin=lo, vmax=hi, edgecolors="k", linewidths=0.4)
            if row == RAW_ROW:
                ax.annotate(name, (r["uniform_loss"]["mean"], r["alignment"]["mean"]),
                            fontsize=8, xytext=(4, 4), textcoords="offset points")
    for row in rows:
        ax.scatter([], [], marker=markers[row], c="w", edgecolors="k", label=row)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("uniformity  log E exp(-2 |u - v|^2)  (lower: more uniform)")
    ax.set_ylabel("alignment  E |f(x) - f(x+)|^2  (lower: better aligned)")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="tuned linear probe test accuracy (%)")
    save_png(plt, fig, out_dir / "alignment_uniformity.png",
              f"{results['dataset']['name']}: alignment vs uniformity (means over seeds)")


def _plot_s_curve(plt, save_png, sv, out_dir):
    if sv:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        s = [p["s"] for p in sv["points"]]
        ax[0].plot(s, [100 * p["val_tuned"] for p in sv["points"]], "o-", label="tuned")
        ax[0].plot(s, [100 * p["val_knn20"] for p in sv["points"]], "s--", label="k-NN 20")
        ref = sv.get("reference_align_uniform")
        if ref:
            ax[0].axhline(100 * ref["val_tuned"], color="C0", lw=0.8, ls=":",
                          label="align_uniform, tuned")
            ax[1].plot([ref["uniform_loss"]], [ref["alignment"]], "k*", label="align_uniform")
            ax[1].legend(fontsize=8)
        ax[0].set_xscale("log", base=2)
        if ref:  # axhline does not widen the limits
            lo, hi = ax[0].get_ylim()
            ax[0].set_ylim(min(lo, 100 * ref["val_tuned"] - 1), max(hi, 100 * ref["val_tuned"] + 1))
        ax[0].set_xlabel("Riesz s")
        ax[0].set_ylabel("validation accuracy (%)")
        ax[0].legend()
        ax[1].plot([p["uniform_loss"] for p in sv["points"]],
                   [p["alignment"] for p in sv["points"]], "o-")
        for p in sv["points"]:
            ax[1].annotate(f"s={p['s']:g}", (p["uniform_loss"], p["alignment"]), fontsize=8)
        ax[1].set_xlabel("uniform_loss (val)")
        ax[1].set_ylabel("alignment (val)")
        save_png(plt, fig, out_dir / "s_validation.png",
                  f"align + Riesz: s by validation (chosen s = {sv['chosen_s']:g})")


def rerender(results_json) -> None:
    """results.md and the plots again, beside a results.json of this driver."""
    from .._io import atomic_write_text

    path = Path(results_json)
    results = json.loads(path.read_text())
    atomic_write_text(path.parent / "results.md", markdown(results))
    plot(results, path.parent)


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
    records, predictions = [], {}
    state = {"cfg": cfg, "dataset": dataset, "sv": sv, "s": s, "t0": t0, "command": command}
    for seed in () if cfg.validate_only else cfg.seeds:
        for name in cfg.objectives:
            print(f"{dataset.name}: {name} seed {seed}", file=sys.stderr, flush=True)
            rec, pred = run_encoder(cfg, dataset, name, seed, s, cache)
            records.append(rec)
            predictions.setdefault(name, {})[seed] = (pred, np.asarray(dataset.y_test))
            raw = rec["rows"][RAW_ROW]
            print(f"  {name} seed {seed}: raw tuned {raw['tuned']['test']:.3f}, train "
                  f"{rec['train_seconds']:.0f} s (cached: {rec['encoder_from_cache']}), rows "
                  f"{rec['rows_seconds']:.0f} s", file=sys.stderr, flush=True)
            _write(state, records, predictions, complete=False)
    return _write(state, records, predictions, complete=True)


def _write(state, records, predictions, *, complete: bool) -> dict[str, Any]:
    from .. import __version__
    from . import report
    from .._io import atomic_write_text

    cfg, dataset = state["cfg"], state["dataset"]
    paired = {}
    if complete:
        for name, pred in predictions.items():
            paired[name] = report.paired_statistics(pred)
    results = {
        "config": dataclasses.asdict(cfg),
        "command": state["command"],
        "dataset": {"name": dataset.name, "n_train": int(len(dataset.y_train)),
                    "n_test": int(len(dataset.y_test)), "source": str(dataset.source)},
        "augmentation": augmentation_for(dataset.name).config(),
        "versions": {"poissonflow": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "riesz_s": state["s"],
        "s_validation": state["sv"],
        "per_encoder": records,
        "summary": summarise(records, cfg.rows),
        "paired": paired,
        "riesz_vs_uniform": riesz_vs_uniform(records),
        "seconds": time.perf_counter() - state["t0"],
        "complete": complete,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_jsonable,
                                                       allow_nan=True))
    atomic_write_text(out / "results.md", markdown(results))
    plot(results, out)
    return results


# --------------------------------------------------------------------------- command line


def _s_value(text: str):
    if text == "validate":
        return text
    import argparse

    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'validate', got {text!r}") \
            from None


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="digits",
                        choices=["digits", "cifar10", "cifar10-subset"])
    parser.add_argument("--data-dir", default=None,
                        help="cifar-10-batches-py folder or the subset .npz (not for digits)")
    parser.add_argument("--objectives", nargs="+", default=list(_ssl.OBJECTIVES),
                        help=f"SSL objectives (default: all: {' '.join(_ssl.OBJECTIVES)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"encoder epochs (default per data set: {EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"pairs per step (default per data set: {BATCH})")
    parser.add_argument("--riesz-s", type=_s_value, default="validate",
                        help="Riesz exponent of align_riesz, or 'validate' (default: chosen "
                             "from --s-grid on a validation split of train)")
    parser.add_argument("--s-grid", type=float, nargs="+", default=list(S_GRID))
    parser.add_argument("--bank-size", type=int, default=None,
                        help=f"align_riesz memory bank rows (default per data set: {BANK})")
    parser.add_argument("--riesz-weight", type=float, default=1.0,
                        help="weight of align_riesz's uniformity term (default 1, as Wang & "
                             "Isola weight theirs)")
    parser.add_argument("--validate-only", action="store_true",
                        help="only the s validation of align_riesz (results.json holds the "
                             "curve)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="experiment rows to score (names as in poissonflow.experiments.experiment)")
    parser.add_argument("--out", default=None, help="output folder (default: "
                                                     "results/ssl-<dataset>)")
    parser.add_argument("--cache-dir", default=None, help="cache (default: <out>/cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N train and N/3 test images (quick runs)")
    parser.add_argument("--progress", action="store_true", help="progress bars")


def config_from_args(args) -> SSLExperimentConfig:
    return SSLExperimentConfig(
        dataset=args.dataset, data_dir=args.data_dir, objectives=tuple(args.objectives),
        seeds=tuple(args.seeds), epochs=args.epochs, batch_size=args.batch_size,
        riesz_s=args.riesz_s, s_grid=tuple(args.s_grid), bank_size=args.bank_size,
        riesz_weight=args.riesz_weight, validate_only=args.validate_only,
        rows=tuple(args.rows), out_dir=args.out or f"results/ssl-{args.dataset}",
        cache_dir=args.cache_dir, device=args.device, threads=args.threads, limit=args.limit,
        progress=args.progress)


def main(args) -> int:
    cfg = config_from_args(args)
    validate_config(cfg)
    import shlex

    command = "python -m poissonflow ssl-experiment " + shlex.join(sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "ssl-experiment" else ""
    results = run_ssl_experiment(cfg, command=command)
    print(markdown(results))
    return 0
