"""Seed-aware re-analysis of a committed run: from its predictions.npz (per seed, every row's and
probe's predicted test labels) the two-level statistics of every row × probe against the raw
features and of the blog's comparisons with the encoder's head (docs/DESIGN.md, "Statistics of
the study"), written beside the run as seed_aware.json and seed_aware.md.

    python -m poissonflow.experiments.reanalyse docs/results/cifar10-subset docs/results/digits ...
    python -m poissonflow.experiments.reanalyse --all            # every run under docs/results
    python -m poissonflow.experiments.reanalyse --all --verdict  # and the verdict page

`run_statistics` is what a driver calls on the predictions it has just made (the same
{seed: ({row: {probe: labels}}, y_test)} that report.paired_statistics takes); its result is
what results.json carries under "seed_aware" and what report renders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_bytes, atomic_write_text
from . import stats
from .verdict import RUNS, attach_image_only, render_page

__all__ = ["run_statistics", "load_predictions", "reanalyse_run", "check_run", "RUNS", "main"]

RAW = "raw features"
# The self-supervised study's runs: --check --all recomputes their statistics too.
SSL_RUNS = ["ssl-digits", "ssl-cifar10-subset"]
HEAD = "encoder head"

# The blog's comparison: (label, (row A, probe A), (row B, probe B)), B minus A (the labels of
# report.BLOG_COMPARISONS, so that the two analyses line up).
BLOG_COMPARISONS = [
    (
        "blog LR on the blog-flowed features − encoder head",
        (HEAD, "head"),
        ("flow: blog preset", "blog"),
    ),
    ("blog LR on the raw features − encoder head", (HEAD, "head"), (RAW, "blog")),
    ("blog LR: blog-flowed − raw features", (RAW, "blog"), ("flow: blog preset", "blog")),
]

# The probes' order in tables: the two of the verdict first, then the others as in report.PROBES;
# probes unknown here (added by a later protocol) follow in the order the run saved them.
PROBE_ORDER = [
    "tuned",
    "blog",
    "blog_converged",
    "knn20",
    "knn",
    "knn200",
    "labels1perclass",
    "labels10perclass",
    "labels1%",
    "labels10%",
]


def load_predictions(
    run_dir: str | Path, rows: list[str] | None = None, group: str | None = None
) -> dict[int, tuple[dict[str, dict[str, np.ndarray]], np.ndarray]]:
    """{seed: ({row: {probe: predicted labels}}, y_test)} from run_dir/predictions.npz (keys
    "seed<s>/y_test" and "seed<s>/<row>/<probe>"). rows: the run's row names (results.json),
    used to split a key whose probe name holds a "/"; without them the last "/" splits.
    group: the self-supervised study's objective (its keys are prefixed "<group>/")."""
    out: dict[int, tuple[dict[str, dict[str, np.ndarray]], np.ndarray]] = {}
    with np.load(Path(run_dir) / "predictions.npz") as archive:
        if group is None:
            z = {k: archive[k] for k in archive.files}
        else:
            cut = len(group) + 1
            z = {k[cut:]: archive[k] for k in archive.files if k.startswith(group + "/")}
        keys = sorted(z)
        ys = {int(k.split("/", 1)[0][4:]): z[k] for k in keys if k.endswith("/y_test")}
        for seed, y in ys.items():
            out[seed] = ({}, y)
        for k in keys:
            head, rest = k.split("/", 1)
            if rest == "y_test":
                continue
            seed = int(head[4:])
            row = next(
                (r for r in sorted(rows or [], key=len, reverse=True) if rest.startswith(r + "/")),
                None,
            )
            if row is None:
                row, probe = rest.rsplit("/", 1)
            else:
                probe = rest[len(row) + 1 :]
            out[seed][0].setdefault(row, {})[probe] = z[k]
    if rows:  # the run's row order, not the archive's alphabetical one
        rank = {r: i for i, r in enumerate(rows)}
        for seed, (by_row, y) in out.items():
            out[seed] = (dict(sorted(by_row.items(), key=lambda kv: rank.get(kv[0], len(rank)))), y)
    return dict(sorted(out.items()))


def _correct(predictions, row: str, probe: str) -> list[np.ndarray] | None:
    vecs = []
    for rows, y in predictions.values():
        pred = rows.get(row, {}).get(probe)
        if pred is None:
            return None
        vecs.append(np.asarray(pred) == np.asarray(y))
    return vecs


def run_statistics(
    predictions: dict,
    *,
    run: str | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The seed-aware statistics of one run.

    predictions: {seed: ({row: {probe: labels}}, y_test)}. run: the run's name, matched against
    stats.PRIMARY[0] to find the primary comparison. Every row × probe against the raw features
    with the same probe, and the blog's comparisons; `stats.paired_summary` for each (the same
    bootstrap seed for all, so every comparison sees the same seed and image draws), then
    `stats.mark_significance` over the run (primary alone, the rest Benjamini-Hochberg).
    Returns {"method": {...}, "against_raw": {probe: {row: summary}}, "blog_comparison":
    {label: summary}}, JSON-ready."""
    first = next(iter(predictions.values()))[0]
    probes = list(dict.fromkeys(p for r, ps in first.items() if r not in (HEAD,) for p in ps))
    order = {p: i for i, p in enumerate(PROBE_ORDER)}
    probes.sort(key=lambda p: order.get(p, len(order)))
    fam: dict[tuple, dict[str, Any]] = {}
    for probe in probes:
        base = _correct(predictions, RAW, probe)
        if base is None:
            continue
        for row in first:
            if row in (RAW, HEAD):
                continue
            cur = _correct(predictions, row, probe)
            if cur is not None:
                fam[("against_raw", probe, row)] = stats.paired_summary(
                    cur, base, n_boot=n_boot, seed=seed, alpha=alpha
                )
    for label, a, b in BLOG_COMPARISONS:
        ca, cb = _correct(predictions, *a), _correct(predictions, *b)
        if ca is not None and cb is not None:
            fam[("blog_comparison", label)] = stats.paired_summary(
                cb, ca, n_boot=n_boot, seed=seed, alpha=alpha
            )
    primary = None
    if run is not None and run == stats.PRIMARY[0]:
        primary = ("against_raw", stats.PRIMARY[2], stats.PRIMARY[1])
    marked = stats.mark_significance(fam, primary=primary, alpha=alpha)
    against: dict[str, dict[str, Any]] = {}
    blog: dict[str, Any] = {}
    for key, summary in marked.items():
        if key[0] == "against_raw":
            against.setdefault(key[1], {})[key[2]] = summary
        else:
            blog[key[1]] = summary
    return {
        "method": {
            "interval": "two-level percentile bootstrap, seeds and test images crossed "
            "(docs/DESIGN.md, 'Statistics of the study')",
            "test": "paired t-test over the per-seed differences, two-sided",
            "n_boot": int(n_boot),
            "bootstrap_seed": int(seed),
            "alpha": alpha,
            "correction": "primary alone at alpha; the rest of the run Benjamini-Hochberg",
            "primary": list(primary[1:]) if primary else None,
            "family_size": len(fam) - (primary is not None and primary in fam),
            "seeds": [int(s) for s in predictions],
            "units": "points (percentage points of test accuracy)",
        },
        "against_raw": against,
        "blog_comparison": blog,
        # the encoder head's test accuracy per seed: the "+3" decomposition's first term
        "head_test": _head_accuracy(predictions),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reanalyse_run(
    run_dir: str | Path,
    *,
    run: str | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """run_statistics of a committed run folder (results.json + predictions.npz), with the
    run's own earlier image-only intervals beside each comparison ("reported"), the inputs'
    SHA-256, and (write) seed_aware.json and seed_aware.md written into the folder."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    rows = list(results["per_seed"][0]["rows"])
    preds = load_predictions(run_dir, rows)
    if run is None:
        run = _run_name(run_dir)
    out = run_statistics(preds, run=run, n_boot=n_boot, seed=seed)
    attach_image_only(out, results)
    out["run"] = run
    out["dataset"] = results.get("dataset", {})
    out["feature_dim"] = (results.get("config") or {}).get("feature_dim") or 128
    out["head_test"] = _head_accuracy(preds)
    out["inputs"] = {
        "predictions.npz": _sha256(run_dir / "predictions.npz"),
        "results.json": _sha256(run_dir / "results.json"),
    }
    out["command"] = f"python -m poissonflow.experiments.reanalyse {run_dir.as_posix()}"
    if write:
        from .report import seed_aware_markdown

        atomic_write_bytes(
            run_dir / "seed_aware.json", json.dumps(out, indent=1, allow_nan=False).encode()
        )
        atomic_write_text(run_dir / "seed_aware.md", seed_aware_markdown(out) + "\n")
    return out


def check_run(
    run_dir: str | Path,
    *,
    only: list[tuple[str, str]] | None = None,
    source: str | None = None,
) -> list[str]:
    """Recomputes a run's committed seed-aware statistics from its committed predictions.npz
    (same n_boot and bootstrap seed as recorded) and lists every disagreement: the
    predictions' SHA-256, and per comparison (probe, row) the mean difference, interval, t-test
    and per-seed figures. only: the (probe, row) pairs to recompute (default all; the blog
    comparisons are checked when only is None). source: "seed_aware.json" or "results.json"
    (its "seed_aware" key); default: results.json where it carries them (the runs of the
    current protocol), else seed_aware.json. A self-supervised run (results.json
    "per_encoder") is checked objective by objective. An empty list: the committed intervals
    are the recomputed ones."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    if "per_encoder" in results:
        rows = list(results["per_encoder"][0]["rows"]) if results["per_encoder"] else []
        return [
            line
            for objective, committed in results.get("seed_aware", {}).items()
            for line in _check_statistics(
                f"{run_dir} ({objective})",
                committed,
                load_predictions(run_dir, rows, group=objective),
                only,
            )
        ]
    if source is None:
        source = "results.json" if "seed_aware" in results else "seed_aware.json"
    if source == "results.json":
        committed = results["seed_aware"]
    else:
        committed = json.loads((run_dir / source).read_text(encoding="utf-8"))
        if committed.get("inputs", {}).get("predictions.npz") != _sha256(
            run_dir / "predictions.npz"
        ):
            return [f"{run_dir}: predictions.npz is not the file the statistics were computed from"]
    preds = load_predictions(run_dir, list(results["per_seed"][0]["rows"]))
    return _check_statistics(str(run_dir), committed, preds, only)


def _check_statistics(where: str, committed: dict, preds, only) -> list[str]:
    m = committed["method"]
    if [int(s) for s in preds] != m["seeds"]:
        return [f"{where}: seeds {list(preds)} in predictions.npz, {m['seeds']} committed"]
    keys = ("mean_diff", "ci95", "t_p", "per_seed_diff", "mcnemar_p_per_seed")
    bad = []
    pairs = only or [(pr, row) for pr, rows in committed["against_raw"].items() for row in rows]
    for probe, row in pairs:
        got = stats.paired_summary(
            _correct(preds, row, probe),
            _correct(preds, RAW, probe),
            n_boot=m["n_boot"],
            seed=m["bootstrap_seed"],
            alpha=m["alpha"],
        )
        want = committed["against_raw"][probe][row]
        bad += [
            f"{where}: {row} / {probe}: {k} committed {want[k]}, recomputed {got[k]}"
            for k in keys
            if not _close(want[k], got[k])
        ]
    if only is None:
        for label, a, b in BLOG_COMPARISONS:
            if label not in committed.get("blog_comparison", {}):
                continue
            got = stats.paired_summary(
                _correct(preds, *b),
                _correct(preds, *a),
                n_boot=m["n_boot"],
                seed=m["bootstrap_seed"],
                alpha=m["alpha"],
            )
            want = committed["blog_comparison"][label]
            bad += [
                f"{where}: {label}: {k} committed {want[k]}, recomputed {got[k]}"
                for k in keys
                if not _close(want[k], got[k])
            ]
    return bad


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-9, atol=1e-12))


def _head_accuracy(preds) -> list[float] | None:
    accs = []
    for rows, y in preds.values():
        p = rows.get(HEAD, {}).get("head")
        if p is None:
            return None
        accs.append(100 * float(np.mean(np.asarray(p) == np.asarray(y))))
    return accs


def _run_name(run_dir: Path) -> str:
    parts = run_dir.resolve().parts
    if "results" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("results") :])
    return run_dir.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m poissonflow.experiments.reanalyse", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("runs", nargs="*", help="run folders holding results.json and predictions.npz")
    ap.add_argument(
        "--all",
        action="store_true",
        help=f"every run of the verdict under --root ({', '.join(r for r, _ in RUNS)})",
    )
    ap.add_argument("--root", default="docs/results")
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--check",
        action="store_true",
        help="recompute the named runs' committed seed-aware statistics from their "
        "predictions.npz and report any disagreement, writing nothing",
    )
    ap.add_argument(
        "--verdict",
        nargs="?",
        const="poissonflow/experiments/README.md",
        help="also render the verdict page's generated parts (table, figures) "
        "into this file (default %(const)s)",
    )
    args = ap.parse_args(argv)
    root = Path(args.root)
    dirs = [Path(r) for r in args.runs]
    if args.all:
        dirs += [root / r for r, _ in RUNS if (root / r / "predictions.npz").exists()]
        if args.check:  # their results.json carries their statistics (nothing to re-analyse)
            dirs += [root / r for r in SSL_RUNS if (root / r / "predictions.npz").exists()]
    if not dirs and not args.verdict:
        ap.error("name run folders or --all")
    if args.check:
        bad = [line for d in dirs for line in check_run(d)]
        for line in bad:
            print(line, file=sys.stderr)
        print(
            f"{len(dirs)} run(s) checked: "
            + (
                "the committed statistics are the recomputed ones"
                if not bad
                else f"{len(bad)} disagreement(s)"
            ),
            file=sys.stderr,
        )
        return 1 if bad else 0
    for d in dirs:
        out = reanalyse_run(d, n_boot=args.n_boot, seed=args.seed)
        print(
            f"{d}: {sum(len(v) for v in out['against_raw'].values())} comparisons with the raw "
            f"features, {len(out['blog_comparison'])} blog comparisons -> "
            f"{d / 'seed_aware.json'}",
            file=sys.stderr,
        )
    if args.verdict:
        render_page(
            root,
            Path(args.verdict),
            pages=[p for p in ("docs/BLOG_FAITHFULNESS.md",) if Path(p).exists()],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
