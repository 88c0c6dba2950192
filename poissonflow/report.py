"""Outputs of the experiment: the summary over seeds, the markdown table, the JSON file and the
plots. Files are written atomically (poissonflow._io: temporary file + os.replace, normal
permissions), so an interrupted run never leaves a half-written result.

matplotlib is imported only by `plot_sweep`, when a plot is drawn: the rest of the package (and
`summarise`, `markdown_table`) never needs it, and a missing install gets one clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["summarise", "markdown_table", "write_outputs", "render_outputs", "load_results",
           "rerender"]

# What a results.json written by write_outputs holds at its top level (what rendering reads).
_RESULT_KEYS = ("config", "dataset", "per_seed", "summary")

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


def _stats(values: list[float]) -> dict[str, float] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    arr = np.asarray(vals)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": len(arr)}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every number of every row."""
    names = list(per_seed[0]["rows"])
    summary: dict[str, Any] = {}
    for name in names:
        rows = [s["rows"][name] for s in per_seed]
        entry: dict[str, Any] = {}
        for title, path in COLUMNS + [
            ("head train", ("head", "train")), ("head train (augmented)", ("head", "train_augmented")),
            ("head train (last epoch, augmented)", ("head", "train_last_epoch")),
            ("head test", ("head", "test")), ("tuned C", ("tuned", "C")),
            ("mean norm", ("mean_norm",)),
        ]:
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


def markdown_table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    n = len(results["per_seed"])
    ds = results["dataset"]
    lines = [
        f"### {ds['name']}: {ds['n_train']} train / {ds['n_test']} test, "
        f"mean ± std over {n} seed(s)",
        "",
        "Accuracies in %. Metrics on the L2-normalised test features: alignment (lower: "
        "views closer), uniform_loss and W2 (lower: more uniform), effective rank.",
        "",
        "| row | " + " | ".join(t for t, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, entry in summary.items():
        if name == "encoder head":
            cells = [_fmt(entry.get("head train (last epoch, augmented)"), True),
                     _fmt(entry.get("head test"), True), _fmt(entry.get("head train"), True),
                     _fmt(entry.get("head test"), True)]
            cells += [_fmt(entry.get(t), False) for t, _ in COLUMNS[4:]]
            name = "encoder head (own classifier)"
        else:
            cells = [_fmt(entry.get(t), i < 4) for i, (t, _) in enumerate(COLUMNS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "encoder head: its train accuracy is the blog's figure (last epoch, augmented batches) "
        "in the 'blog LR train' column and on clean images in 'tuned train'.",
    ]
    sweeps = [seed.get("sweep", []) for seed in results["per_seed"]]
    if any(sweeps):
        lines += ["", sweep_table(sweeps)]
    return "\n".join(lines)


def sweep_table(per_seed: list[list[dict[str, Any]]]) -> str:
    """The horizon sweep as markdown: per curve and point, how far along the flow, the tuned
    probe's test accuracy and W2 (mean ± std over seeds)."""
    lines = ["Horizon sweep (tuned probe, test accuracy in %; W2 of the test features):", "",
             "| curve | fraction of the flow | test accuracy | W2 unif. |", "|---|---|---|---|"]
    for curve, c in sweep_curves(per_seed).items():
        for i in range(len(c["fraction"])):
            lines.append(
                f"| {curve} | {c['fraction'][i]:.2f} | {100 * c['accuracy'][i]:.1f} ± "
                f"{100 * c['accuracy_std'][i]:.1f} | {c['w2'][i]:.3f} ± {c['w2_std'][i]:.3f} |")
    return "\n".join(lines)


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
        raise ValueError(f"not an experiment results.json: {where} holds a "
                         f"{type(results).__name__}, not an object")
    missing = [k for k in _RESULT_KEYS if k not in results]
    if missing:
        raise ValueError(f"not an experiment results.json: {where} lacks {', '.join(missing)}")
    per_seed = results["per_seed"]
    if not isinstance(per_seed, list) or not per_seed or not all(
            isinstance(s, dict) and isinstance(s.get("rows"), dict) for s in per_seed):
        raise ValueError(f"not an experiment results.json: {where}: per_seed is not a "
                         "non-empty list of seeds with rows")
    if not isinstance(results["dataset"], dict) or not {"name", "n_train", "n_test"} <= set(
            results["dataset"]):
        raise ValueError(f"not an experiment results.json: {where}: dataset lacks name, "
                         "n_train or n_test")


def rerender(results_json: str | Path) -> None:
    """Render results.md and the plot again from a results.json (after a change to this
    module), next to that file; the JSON itself is left as it is."""
    path = Path(results_json)
    render_outputs(load_results(path), path.parent)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "results.json",
                       json.dumps(_jsonable(results), indent=1).encode())
    render_outputs(results, out_dir)


def render_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """results.md and the sweep plot, from the results (as run or as read from the JSON)."""
    _check_results(results, "the results")
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", markdown_table(results) + "\n")
    sweeps = [s.get("sweep", []) for s in results["per_seed"]]
    if any(sweeps):
        plot_sweep(sweeps, out_dir / "accuracy_vs_uniformity.png",
                   title=f"{results['dataset']['name']}: accuracy along the flow")


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
        out[curve] = {"fraction": frac.mean(0), "accuracy": acc.mean(0), "w2": w2.mean(0),
                      "accuracy_std": acc.std(0), "w2_std": w2.std(0),
                      "knob": runs[0][0]["knob"], "seeds": len(runs)}
    return out


def plot_sweep(per_seed: list[list[dict[str, Any]]], path: Path, title: str) -> None:
    """Two panels: tuned-probe test accuracy against Wasserstein uniformity (the trade-off
    curve), and against the fraction of the flow completed; one line per curve, mean over
    seeds with the seeds' standard deviation as error bars."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve, c in sweep_curves(per_seed).items():
        n = c["seeds"]
        axes[0].errorbar(c["w2"], c["accuracy"], xerr=c["w2_std"], yerr=c["accuracy_std"],
                         fmt="o-", capsize=2, label=f"{curve} ({n} seed{'s' * (n > 1)})")
        axes[1].errorbar(c["fraction"], c["accuracy"], yerr=c["accuracy_std"], fmt="o-",
                         capsize=2, label=f"{curve} ({c['knob']})")
    axes[0].set_xlabel("Wasserstein uniformity of test features (lower: more uniform)")
    axes[0].set_ylabel("tuned linear probe, test accuracy")
    axes[1].set_xlabel("fraction of the flow (blog: steps / 100; exact: log z / log z_max)")
    axes[1].set_ylabel("tuned linear probe, test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def _pyplot():
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
