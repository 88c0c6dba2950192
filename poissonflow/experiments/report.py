"""Outputs of the experiment: the summary over seeds, the markdown table, the JSON file and the
plots (over 600 lines: every table of a run, image-only and seed-aware, renders from one
results.json here, so that a re-render needs no other module). Files are written atomically
(poissonflow._io: temporary file + os.replace, normal
permissions), so an interrupted run never leaves a half-written result.

matplotlib is imported only by `plot_sweep`, when a plot is drawn: the rest of the package (and
`summarise`, `markdown_table`) never needs it, and a missing install gets one clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, atomic_write_bytes, atomic_write_text
from .summary import _stats

__all__ = [
    "summarise",
    "markdown_table",
    "write_outputs",
    "render_outputs",
    "load_results",
    "rerender",
    "paired_statistics",
    "write_predictions",
    "PROBES",
    "comparison_cell",
    "pyplot",
    "save_png",
    "seed_aware_cell",
    "seed_aware_markdown",
]

# What a results.json written by write_outputs holds at its top level (what rendering reads).
_RESULT_KEYS = ("config", "dataset", "per_seed", "summary")

# The probes every row is scored by: (key in a row, title); paired tests use the same keys.
# The first two are the table's fixed columns; k-NN's k and every C are chosen on the held-out
# validation split (protocol.py).
PROBES = [
    ("blog", "blog LR"),
    ("tuned", "tuned"),
    ("blog_converged", "blog LR, converged"),
    ("knn20", "k-NN 20"),
    ("knn", "k-NN, k on validation"),
    ("labels1perclass", "1 label a class"),
    ("labels10perclass", "10 labels a class"),
]

# Row info summarised over seeds besides the columns (title, path).
_INFO = [
    ("guarded fraction", ("info", "guarded_fraction")),
    ("on-plane fraction", ("info", "on_plane_fraction")),
    ("largest norm / median", ("info", "norm_max_over_median")),
    ("field iterations", ("info", "field_iterations")),
    ("field final loss", ("info", "field_final_loss")),
    ("convergence warnings", ("convergence_warnings",)),
]

# (column title, path into a row) in table order
COLUMNS = [
    ("blog LR train", ("blog", "train")),
    ("blog LR test", ("blog", "test")),
    ("tuned train", ("tuned", "train")),
    ("tuned test", ("tuned", "test")),
    ("alignment", ("metrics", "alignment")),
    ("uniform_loss", ("metrics", "uniform_loss")),
    ("W2 unif.", ("metrics", "wasserstein_uniformity")),
    ("eff. rank", ("metrics", "effective_rank")),
]


def _get(row: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(row, dict) or k not in row:
            return None
        row = row[k]
    return row


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every number of every row."""
    names = list(per_seed[0]["rows"])
    summary: dict[str, Any] = {}
    for name in names:
        rows = [s["rows"][name] for s in per_seed]
        entry: dict[str, Any] = {}
        for title, path in (
            COLUMNS
            + [
                ("head train", ("head", "train")),
                ("head train (augmented)", ("head", "train_augmented")),
                ("head train (last epoch, augmented)", ("head", "train_last_epoch")),
                ("head test", ("head", "test")),
                ("tuned C", ("tuned", "C")),
                ("mean norm", ("mean_norm",)),
            ]
            + [(title, (key, "test")) for key, title in PROBES[2:]]
            + _INFO
        ):
            st = _stats([_get(r, path) for r in rows])
            if st is not None:
                entry[title] = st
        summary[name] = entry
    return summary


def _fmt(st: dict[str, float] | None, pct: bool) -> str:
    if st is None:
        return "–"
    if pct:
        return f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}"
    return f"{st['mean']:.3f} ± {st['std']:.3f}"


def _sum_over_seeds(results, name, path) -> int | None:
    vals = [_get(seed["rows"].get(name, {}), path) for seed in results["per_seed"]]
    vals = [v for v in vals if v is not None]
    return int(sum(vals)) if vals else None


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def comparison_cell(
    cmp: dict | None, n_seeds_sig: int | None = None, n_seeds: int = 0, star: bool = True
) -> str:
    """'+0.4 [-0.2, +1.0] p=0.21' in points; '*' marks p < 0.05 (McNemar) unless star is
    False."""
    if cmp is None:
        return "–"
    lo, hi = cmp["ci"]
    star = "*" if star and cmp["p_mcnemar"] < 0.05 else ""
    cell = f"{_pct(cmp['diff'])} [{_pct(lo)}, {_pct(hi)}] p={cmp['p_mcnemar']:.2g}{star}"
    if n_seeds_sig is not None:
        cell += f" ({n_seeds_sig}/{n_seeds})"
    return cell


def markdown_table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    n = len(results["per_seed"])
    ds = results["dataset"]
    dim = _get(results["per_seed"][0]["rows"].get("encoder head", {}), ("dim",))
    lines = [
        f"### {ds['name']}: {ds['n_train']} train / {ds['n_test']} test"
        + (f", {dim}-d features" if dim is not None else "")
        + f", mean ± std over {n} seed(s)",
        "",
    ]
    lines += _status_lines(results)
    lines += [
        "Test accuracies in %, every probe of every row (docs/DESIGN.md, 'Metrics and "
        "probes'): the blog's `LogisticRegression()`, the tuned linear probe, the same "
        "classifier run to convergence, cosine k-NN "
        "(k = 20, and k chosen on the validation split), and linear probes fit on 1 / 10 "
        "labelled training images a class (C chosen on the validation split; a probe of the "
        "features, whose encoder saw every label). 'warnings': ConvergenceWarnings "
        "of all of the row's probe fits, summed over seeds.",
        "",
        "| row | " + " | ".join(t for _, t in PROBES) + " | warnings |",
        "|---|" + "---|" * (len(PROBES) + 1),
    ]
    for name, entry in summary.items():
        if name == "encoder head":
            cells = [_fmt(entry.get("head test"), True)] + ["–"] * (len(PROBES) - 1) + ["–"]
            lines.append("| encoder head (own classifier) | " + " | ".join(cells) + " |")
            continue
        cells = [_fmt(entry.get("blog LR test"), True), _fmt(entry.get("tuned test"), True)]
        cells += [_fmt(entry.get(t), True) for _, t in PROBES[2:]]
        warn = _sum_over_seeds(results, name, ("convergence_warnings",))
        cells.append("–" if warn is None else str(warn))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seed_aware = results.get("seed_aware")
    if seed_aware:
        lines += ["", seed_aware_markdown(seed_aware, heading=False, before_after=False)]
    paired = results.get("paired")
    if paired:
        lines += ["", _paired_table(paired, n, seed_aware=bool(seed_aware))]
        if not seed_aware:
            lines += ["", _blog_comparison(paired, n)]
    lines += [
        "",
        "Train accuracies and representation metrics (alignment: lower is closer views; "
        "uniform_loss and W2: lower is more uniform), on the L2-normalised test features. "
        "guarded / on plane: of the points flowed (train, test, two views), the share the "
        "radial or log-z guard skipped at least once, and the share that ended exactly on the "
        "plane z = 0 (docs/DESIGN.md, 'The flow'); iterations and final loss: of the row's "
        "learned field.",
        "",
        "| row | "
        + " | ".join(t for t, _ in COLUMNS if "test" not in t)
        + " | guarded % | on plane % | largest norm / median | field iterations "
        "| field final loss |",
        "|---|" + "---|" * (len([t for t, _ in COLUMNS if "test" not in t]) + 5),
    ]
    for name, entry in summary.items():
        if name == "encoder head":
            cells = [
                _fmt(entry.get("head train (augmented)"), True),
                _fmt(entry.get("head train"), True),
            ]
            cells += [_fmt(entry.get(t), False) for t, _ in COLUMNS[4:]]
            name = "encoder head (own classifier)"
        else:
            cells = [
                _fmt(entry.get(t), i < 4) for i, (t, _) in enumerate(COLUMNS) if "test" not in t
            ]
        for key, pct in (
            ("guarded fraction", True),
            ("on-plane fraction", True),
            ("largest norm / median", False),
            ("field iterations", False),
            ("field final loss", False),
        ):
            st = entry.get(key)
            if st is None:
                cells.append("–")
            elif key == "field iterations":
                cells.append(f"{st['mean']:.0f}")
            elif key == "largest norm / median":  # the worst seed: one far point is enough
                cells.append(f"{st['max']:.3g}")
            else:
                cells.append(_fmt(st, pct))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "encoder head: 'blog LR train' holds the blog's train figure, the head's accuracy in "
        "eval mode on one augmented pass over the training images (the blog's code evaluates "
        "its train loader, which augments); 'tuned train' holds it on the clean images. The "
        "train-mode accuracy over the last epoch's batches is in results.json "
        "(head.train_last_epoch).",
    ]
    sweeps = [seed.get("sweep", []) for seed in results["per_seed"]]
    if any(sweeps):
        lines += ["", sweep_table(sweeps)]
    return "\n".join(lines)


def _status_lines(results: dict[str, Any]) -> list[str]:
    """A partial run's mark (written after each seed until the last), and a note when the
    seeds were computed by different package sources (a run resumed after a code change)."""
    lines = []
    if results.get("complete") is False:
        done = [str(s.get("seed")) for s in results["per_seed"]]
        planned = results.get("seeds_planned") or _get(results, ("config", "seeds")) or []
        lines += [
            f"**Partial results: {len(done)} of {len(planned)} planned seeds done "
            f"(seeds {', '.join(done)}).** The run was still going or was stopped when "
            "this was written; the same command resumes it at the next seed.",
            "",
        ]
    sources = [h for h in results.get("source_sha256", []) if h != "unknown"]
    if len(sources) > 1:
        lines += [
            f"The seeds were computed by {len(sources)} different versions of the "
            "package's sources (a run resumed after a code change; per_seed[i]"
            ".source_sha256 in results.json).",
            "",
        ]
    return lines


def _paired_table(paired: dict[str, Any], n_seeds: int, seed_aware: bool = False) -> str:
    if seed_aware:
        intro = (
            "The earlier, image-only analysis, kept for comparison (not significance "
            "claims: the seed-aware table above is the analysis): every row against the "
            "raw features, pooled over seeds, with a bootstrap 95% interval that resamples "
            "images within each seed and holds the seeds fixed, the pooled exact McNemar "
            "p-value, and (k/n) the seeds whose own McNemar test has p < 0.05. Pooling "
            "treats each (seed, image) as an item although the test images recur in "
            "every seed."
        )
    else:
        intro = (
            "Every row against the raw features, image by image (same encoder, same test "
            "images): test accuracy difference in points, pooled over seeds, with its "
            "bootstrap 95% interval (images resampled within each seed) and the exact "
            "McNemar p-value; * marks p < 0.05, and (k/n) counts the seeds whose own "
            "McNemar test has p < 0.05. Pooling treats each (seed, image) as an item "
            "although the test images recur in every seed, so the per-seed counts are the "
            "conservative reading."
        )
    lines = [
        intro,
        "",
        "| row | " + " | ".join(f"Δ {t}" for _, t in PROBES) + " |",
        "|---|" + "---|" * len(PROBES),
    ]
    against = paired["against_raw"]
    rows = list(next(iter(against.values())))
    for name in rows:
        cells = []
        for key, _ in PROBES:
            entry = against.get(key, {}).get(name)
            if entry is None:
                cells.append("–")
                continue
            sig = sum(c["p_mcnemar"] < 0.05 for c in entry["per_seed"].values())
            cells.append(
                comparison_cell(entry["pooled"], sig, len(entry["per_seed"]), star=not seed_aware)
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _blog_comparison(paired: dict[str, Any], n_seeds: int) -> str:
    blog = paired.get("blog_comparison", {})
    if not blog:
        return ""
    lines = [
        "The blog's own comparison (its AlexNet head against the default "
        "`LogisticRegression()` on the flowed features) and the baseline it left out "
        "(the same classifier on the raw features), in points, pooled over seeds:",
        "",
        "| comparison | pooled difference [95% CI], McNemar p (seeds p < 0.05) | per seed |",
        "|---|---|---|",
    ]
    for label, entry in blog.items():
        sig = sum(c["p_mcnemar"] < 0.05 for c in entry["per_seed"].values())
        per = ", ".join(_pct(c["diff"]) for c in entry["per_seed"].values())
        lines.append(
            f"| {label} | {comparison_cell(entry['pooled'], sig, len(entry['per_seed']))} | {per} |"
        )
    return "\n".join(lines)


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def _minus(text: str) -> str:
    """Typographic minus signs in a run of signed numbers (not in p-values' exponents)."""
    return text.replace("-", "−")


def seed_aware_cell(s: dict | None, *, p: bool = True) -> str:
    """'−1.9 [−3.3, −0.5] p=0.04*' in points: the mean over seeds of the per-seed differences,
    the two-level bootstrap interval, the paired t-test's p over seeds; * significant after the
    study's correction (docs/DESIGN.md, "Statistics of the study"), ** the primary comparison
    (tested alone) significant, † the primary comparison not significant."""
    if s is None:
        return "–"
    lo, hi = s["ci95"]
    cell = _minus(f"{s['mean_diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    if p:
        cell += f" p={_p(s.get('t_p'))}"
    if s.get("primary"):
        cell += "**" if s.get("significant") else "†"
    elif s.get("significant"):
        cell += "*"
    return cell


def seed_aware_markdown(sa: dict[str, Any], heading: bool = True, before_after: bool = True) -> str:
    """The seed-aware tables of one run (reanalyse.run_statistics / seed_aware.json): every row
    x probe against the raw features, the blog's comparisons with per-seed differences, and,
    where the run's earlier image-only intervals are known, the two side by side."""
    m = sa["method"]
    lines = []
    if heading:
        title = sa.get("run", "run")
        lines += [f"### {title}: seed-aware comparisons ({len(m['seeds'])} seeds)", ""]
        if sa.get("command"):
            lines += [
                f"Written by `{sa['command']}` from the run's predictions.npz "
                f"(SHA-256 {sa.get('inputs', {}).get('predictions.npz', '?')[:12]}…).",
                "",
            ]
    primary = m.get("primary")
    lines += [
        "Every row against the raw features with the same probe, in points: the mean over "
        f"seeds of the per-seed accuracy differences, a 95% interval from a two-level bootstrap "
        f"({m['n_boot']} replicates: seeds and test images resampled together, crossed), and "
        "the paired t-test over the seeds (two-sided). * significant after Benjamini–Hochberg "
        f"over this run's {m['family_size']} comparisons"
        + (
            f"; the primary comparison ({primary[1]} vs raw, {primary[0]} probe) is tested "
            "alone: ** significant, † not"
            if primary
            else ""
        )
        + ' (docs/DESIGN.md, "Statistics of the study").',
        "",
    ]
    against = sa["against_raw"]
    probes = list(against)
    rows = list(dict.fromkeys(r for pr in against.values() for r in pr))
    lines += [
        "| row | " + " | ".join(f"Δ {pr}" for pr in probes) + " |",
        "|---|" + "---|" * len(probes),
    ]
    for row in rows:
        cells = [seed_aware_cell(against[pr].get(row)) for pr in probes]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    blog = sa.get("blog_comparison") or {}
    if blog:
        lines += [
            "",
            "The blog's comparison (its encoder head against the default "
            "`LogisticRegression()`) and the baseline it left out:",
            "",
            "| comparison | Δ [two-level 95%] t-test p | per seed |",
            "|---|---|---|",
        ]
        for label, s in blog.items():
            per = _minus(", ".join(f"{v:+.1f}" for v in s["per_seed_diff"]))
            lines.append(f"| {label} | {seed_aware_cell(s)} | {per} |")
    before = [
        (pr, row, against[pr][row])
        for pr in probes
        for row in rows
        if before_after and row in against[pr] and against[pr][row].get("reported_image_only")
    ]
    if before:
        lines += [
            "",
            "Before and after: the run's earlier interval (images resampled within "
            "each seed, seeds fixed; pooled McNemar p) against the two-level one "
            "(t-test p over seeds).",
            "",
            "| row | probe | earlier: Δ [image-only 95%] McNemar p | two-level: Δ [95%] "
            "t-test p | per seed |",
            "|---|---|---|---|---|",
        ]
        for pr, row, s in before:
            r = s["reported_image_only"]
            old = (
                _minus(f"{r['diff']:+.1f} [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}]")
                + f" p={_p(r['p_mcnemar_pooled'])}"
            )
            per = _minus(", ".join(f"{v:+.1f}" for v in s["per_seed_diff"]))
            lines.append(f"| {row} | {pr} | {old} | {seed_aware_cell(s)} | {per} |")
    return "\n".join(lines)


def sweep_table(per_seed: list[list[dict[str, Any]]]) -> str:
    """The horizon sweep as markdown: per curve and point, how far along the flow, the tuned
    probe's test accuracy and W2 (mean ± std over seeds)."""
    lines = [
        "Horizon sweep (tuned probe, test accuracy in %; W2 of the test features):",
        "",
        "| curve | fraction of the flow | test accuracy | W2 unif. |",
        "|---|---|---|---|",
    ]
    for curve, c in sweep_curves(per_seed).items():
        for i in range(len(c["fraction"])):
            lines.append(
                f"| {curve} | {c['fraction'][i]:.2f} | {100 * c['accuracy'][i]:.1f} ± "
                f"{100 * c['accuracy_std'][i]:.1f} | {c['w2'][i]:.3f} ± {c['w2_std'][i]:.3f} |"
            )
    return "\n".join(lines)


# The blog's comparison: (label, (row A, probe A), (row B, probe B)), B minus A.
BLOG_COMPARISONS = [
    (
        "blog LR on the blog-flowed features − encoder head",
        ("encoder head", "head"),
        ("flow: blog preset", "blog"),
    ),
    (
        "blog LR on the raw features − encoder head",
        ("encoder head", "head"),
        ("raw features", "blog"),
    ),
    (
        "blog LR: blog-flowed − raw features",
        ("raw features", "blog"),
        ("flow: blog preset", "blog"),
    ),
]
RAW = "raw features"


def paired_statistics(predictions: dict, *, n_boot: int = 2000) -> dict[str, Any]:
    """Paired comparisons from the per-image test predictions.

    predictions: {seed: ({row: {probe: labels (n_test,)}}, y_test)}. Returns
    {"against_raw": {probe: {row: {"per_seed": {seed: cmp}, "pooled": cmp}}},
     "blog_comparison": {label: {"per_seed": ..., "pooled": ...}}}, cmp as returned by
    probes.paired_comparison (B = the row, A = the raw features with the same probe). Pooled:
    every seed's test images together, the bootstrap resampling within each seed."""
    from .probes import paired_comparison

    seeds = list(predictions)

    def correct(seed, row, probe):
        rows, y = predictions[seed]
        pred = rows.get(row, {}).get(probe)
        return None if pred is None else np.asarray(pred) == np.asarray(y)

    def compare(a, b):
        per_seed, pooled_a, pooled_b, strata = {}, [], [], []
        for seed in seeds:
            ca, cb = correct(seed, *a), correct(seed, *b)
            if ca is None or cb is None:
                return None
            per_seed[str(seed)] = paired_comparison(ca, cb, n_boot=n_boot, seed=int(seed))
            pooled_a.append(ca)
            pooled_b.append(cb)
            strata.append(np.full(ca.size, int(seed)))
        pooled = paired_comparison(
            np.concatenate(pooled_a),
            np.concatenate(pooled_b),
            strata=np.concatenate(strata),
            n_boot=n_boot,
            seed=0,
        )
        return {"per_seed": per_seed, "pooled": pooled}

    rows = [r for r in predictions[seeds[0]][0] if r not in ("encoder head", RAW)]
    against: dict[str, Any] = {}
    for probe, _ in PROBES:
        against[probe] = {}
        for row in rows:
            cmp = compare((RAW, probe), (row, probe))
            if cmp is not None:
                against[probe][row] = cmp
    blog = {}
    for label, a, b in BLOG_COMPARISONS:
        cmp = compare(a, b)
        if cmp is not None:
            blog[label] = cmp
    return {"against_raw": against, "blog_comparison": blog}


def write_predictions(predictions: dict, out_dir: Path, *, groups: bool = False) -> None:
    """predictions.npz beside results.json: per seed the test labels ("seed<s>/y_test") and
    every row's and probe's predicted labels ("seed<s>/<row>/<probe>"), for paired tests.
    groups: predictions is {group: {seed: ...}} (the self-supervised study's objectives), each
    key then prefixed "<group>/"."""
    arrays = {}
    for group, by_seed in predictions.items() if groups else [("", predictions)]:
        prefix = f"{group}/" if groups else ""
        for seed, (rows, y) in by_seed.items():
            arrays[f"{prefix}seed{seed}/y_test"] = np.asarray(y)
            for row, probes in rows.items():
                for probe, pred in probes.items():
                    arrays[f"{prefix}seed{seed}/{row}/{probe}"] = np.asarray(pred)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "predictions.npz", lambda f: np.savez_compressed(f, **arrays))


def load_results(results_json: str | Path) -> dict[str, Any]:
    """The results of an experiment, read from its results.json.

    Raises FileNotFoundError for a missing file and ValueError ("not an experiment
    results.json: ...") for a file that is not JSON or does not hold an experiment's results,
    so that a wrong path gets one clear line instead of a KeyError deep in the rendering.
    """
    path = Path(results_json)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"not an experiment results.json: {path} is a folder") from None
    except UnicodeDecodeError:
        raise ValueError(f"not an experiment results.json: {path} is not UTF-8 text") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not an experiment results.json: {path} is not JSON ({exc})") from None
    _check_results(results, str(path))
    return results


def _check_results(results: Any, where: str) -> None:
    if not isinstance(results, dict):
        raise ValueError(
            f"not an experiment results.json: {where} holds a "
            f"{type(results).__name__}, not an object"
        )
    missing = [k for k in _RESULT_KEYS if k not in results]
    if missing:
        raise ValueError(f"not an experiment results.json: {where} lacks {', '.join(missing)}")
    per_seed = results["per_seed"]
    if (
        not isinstance(per_seed, list)
        or not per_seed
        or not all(isinstance(s, dict) and isinstance(s.get("rows"), dict) for s in per_seed)
    ):
        raise ValueError(
            f"not an experiment results.json: {where}: per_seed is not a "
            "non-empty list of seeds with rows"
        )
    if not isinstance(results["dataset"], dict) or not {"name", "n_train", "n_test"} <= set(
        results["dataset"]
    ):
        raise ValueError(
            f"not an experiment results.json: {where}: dataset lacks name, n_train or n_test"
        )


def rerender(results_json: str | Path) -> None:
    """Render results.md and the plot again from a results.json (after a change to this
    module), next to that file; the JSON itself is left as it is. (The self-supervised study's
    results: ssl_report.rerender.)"""
    path = Path(results_json)
    render_outputs(_with_side_file(load_results(path), path.parent), path.parent)


def _with_side_file(results: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The results with the seed-aware statistics of a re-analysis (seed_aware.json beside
    them, written by reanalyse) where the results themselves do not carry them."""
    side = Path(folder) / "seed_aware.json"
    if results.get("seed_aware") or not side.exists():
        return results
    return {**results, "seed_aware": json.loads(side.read_text(encoding="utf-8"))}


def rerender_table(results_json: str | Path) -> None:
    """Only results.md again (with a seed_aware.json beside it), the plots left as they are."""
    path = Path(results_json)
    results = _with_side_file(load_results(path), path.parent)
    atomic_write_text(path.parent / "results.md", markdown_table(results) + "\n")


def _jsonable(obj):
    """The package's one JSON converter (files.jsonable): numpy scalars and arrays as Python
    numbers and lists, non-finite floats as None, paths as strings."""
    from ..files import jsonable

    return jsonable(obj)


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "results.json", json.dumps(_jsonable(results), indent=1).encode())
    render_outputs(results, out_dir)


def render_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """results.md and the sweep plot, from the results (as run or as read from the JSON)."""
    _check_results(results, "the results")
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", markdown_table(results) + "\n")
    sweeps = [s.get("sweep", []) for s in results["per_seed"]]
    if any(sweeps):
        plot_sweep(
            sweeps,
            out_dir / "accuracy_vs_uniformity.png",
            title=f"{results['dataset']['name']}: accuracy along the flow",
        )
    curves = loss_curves(results["per_seed"])
    if curves:
        plot_loss_curves(
            curves,
            out_dir / "field_loss_curves.png",
            title=f"{results['dataset']['name']}: learned-field training loss",
        )


def loss_curves(per_seed: list[dict[str, Any]]) -> dict[str, list[tuple[Any, list[float]]]]:
    """{row: [(seed, per-epoch loss of that seed's field)]} for the rows whose learned field
    trained."""
    out: dict[str, list[tuple[Any, list[float]]]] = {}
    for seed in per_seed:
        for name, row in seed["rows"].items():
            hist = _get(row, ("info", "field_loss_history"))
            if hist:
                out.setdefault(name, []).append((seed.get("seed"), [float(v) for v in hist]))
    return out


def plot_loss_curves(
    curves: dict[str, list[tuple[Any, list[float]]]], path: Path, title: str
) -> None:
    """One panel per learned field: the mean training loss of every epoch, one line a seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], curves.items()):
        for seed, h in runs:
            ax.plot(np.arange(1, len(h) + 1), h, lw=1, label=f"seed {seed}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss of the epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(plt, fig, path, title)


def sweep_curves(per_seed: list[list[dict[str, Any]]]) -> dict[str, dict[str, np.ndarray]]:
    """Mean and standard deviation over seeds of each sweep curve, point by point.

    Points are matched by their position along the curve, not by value: the exact field's
    horizon (z_max from the seed's own charges) differs slightly between seeds, so its values
    never coincide. Returns {curve: {"fraction", "accuracy", "w2" (means), "accuracy_std",
    "w2_std", "knob", "seeds"}}; a curve with a different number of points in some seed is refused.
    """
    by_curve: dict[str, list[list[dict[str, Any]]]] = {}
    for points in per_seed:
        seen: dict[str, list[dict[str, Any]]] = {}
        for p in points:
            seen.setdefault(p["curve"], []).append(p)
        for curve, pts in seen.items():
            by_curve.setdefault(curve, []).append(pts)
    out = {}
    for curve, runs in sorted(by_curve.items()):
        if len({len(r) for r in runs}) != 1:
            raise ValueError(f"sweep curve {curve!r} has different lengths across seeds")

        def stack(key, runs=runs):
            return np.array([[p[key] for p in r] for r in runs], dtype=np.float64)

        frac, acc, w2 = stack("fraction"), stack("test_accuracy"), stack("wasserstein_uniformity")
        out[curve] = {
            "fraction": frac.mean(0),
            "accuracy": acc.mean(0),
            "w2": w2.mean(0),
            "accuracy_std": acc.std(0),
            "w2_std": w2.std(0),
            "knob": runs[0][0]["knob"],
            "seeds": len(runs),
        }
    return out


def plot_sweep(per_seed: list[list[dict[str, Any]]], path: Path, title: str) -> None:
    """Two panels: tuned-probe test accuracy against Wasserstein uniformity (the trade-off
    curve), and against the fraction of the flow completed; one line per curve, mean over
    seeds with the seeds' standard deviation as error bars."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve, c in sweep_curves(per_seed).items():
        n = c["seeds"]
        axes[0].errorbar(
            c["w2"],
            c["accuracy"],
            xerr=c["w2_std"],
            yerr=c["accuracy_std"],
            fmt="o-",
            capsize=2,
            label=f"{curve} ({n} seed{'s' * (n > 1)})",
        )
        axes[1].errorbar(
            c["fraction"],
            c["accuracy"],
            yerr=c["accuracy_std"],
            fmt="o-",
            capsize=2,
            label=f"{curve} ({c['knob']})",
        )
    axes[0].set_xlabel("Wasserstein uniformity of test features (lower: more uniform)")
    axes[0].set_ylabel("tuned linear probe, test accuracy")
    axes[1].set_xlabel("fraction of the flow (blog: steps / 100; exact: log z / log z_max)")
    axes[1].set_ylabel("tuned linear probe, test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(plt, fig, path, title)


def save_png(plt, fig, path: Path, title: str) -> None:
    """Titles and lays out `fig`, writes it to `path` atomically as a PNG, and frees it."""
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported here and
    not at module import, so that a missing matplotlib fails only where a plot is drawn."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "the experiment's plot needs matplotlib, a dependency of poissonflow that is not "
            "installed here: pip install matplotlib (or reinstall poissonflow)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
