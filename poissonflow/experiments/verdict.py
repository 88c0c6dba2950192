"""The study's verdict page, generated from the runs' seed-aware statistics (seed_aware.json,
written by reanalyse; or results.json's "seed_aware" where a run carries it): one table across
data sets and dimensions, a forest plot of its intervals, and the decomposition of the blog's
"+3" (head → logistic regression on the raw features → on the flowed features).

The page (poissonflow/experiments/README.md) is prose written by hand around blocks that this
module fills: everything between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` is
replaced, the rest left as it is. `python -m poissonflow.experiments.reanalyse --all --verdict`
re-analyses the runs and renders the page; `render_page` alone renders it from the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from .report import _minus, pyplot, save_png, seed_aware_cell

__all__ = [
    "RUNS",
    "MAIN_ROWS",
    "VERDICT_RUNS",
    "load_runs",
    "verdict_table",
    "before_after_table",
    "plus3_table",
    "faithful_table",
    "plot_forest",
    "plot_plus3",
    "render_page",
]

# The committed runs the verdict reads, (folder under docs/results, label).
RUNS = [
    ("digits-d8", "digits 8-d"),
    ("digits-d16", "digits 16-d"),
    ("digits-d32", "digits 32-d"),
    ("digits-d128", "digits 128-d"),
    ("digits", "digits 128-d (default run)"),
    ("digits/faithful", "digits 128-d --faithful"),
    ("cifar10-subset", "CIFAR-10 subset 128-d"),
]

# The rows of the verdict (the flows, and whitening: uniformity without a flow), and the runs
# of its columns; the other rows and runs are in each run's seed_aware.md.
MAIN_ROWS = [
    ("flow: blog preset", "blog flow (200 epochs)"),
    ("flow: untrained blog field", "blog flow, untrained field"),
    ("flow: blog preset, to plateau", "blog flow, field to plateau"),
    ("flow: PFGM preset, to plateau", "PFGM flow, field to plateau"),
    ("flow: exact field", "exact-field flow"),
    ("ZCA whitening", "ZCA whitening (no flow)"),
]
VERDICT_RUNS = ["digits-d8", "digits-d16", "digits-d32", "digits-d128", "cifar10-subset"]
VERDICT_PROBES = [
    ("tuned", "tuned probe"),
    ("blog", "blog's classifier"),
    ("blog_converged", "blog's classifier, converged"),
]
PLUS3 = [
    "blog LR on the raw features − encoder head",
    "blog LR: blog-flowed − raw features",
    "blog LR on the blog-flowed features − encoder head",
]
FOREST_PNG = "docs/results/verdict_forest.png"
PLUS3_PNG = "docs/results/verdict_plus3.png"


def _label(run: str) -> str:
    return dict(RUNS).get(run, run)


def image_only_comparison(results: dict, section: str, *keys: str) -> dict[str, Any] | None:
    """The committed run's own (image-only, pooled) comparison, for before/after."""
    node = results.get("paired", {}).get(section, {})
    for k in keys:
        node = node.get(k, {}) if isinstance(node, dict) else {}
    pooled = node.get("pooled") if isinstance(node, dict) else None
    if not pooled:
        return None
    return {
        "diff": 100 * pooled["diff"],
        "ci95": [100 * v for v in pooled["ci"]],
        "p_mcnemar_pooled": pooled["p_mcnemar"],
    }


def attach_image_only(sa: dict[str, Any], results: dict) -> dict[str, Any]:
    """Beside each of the seed-aware statistics `sa` ("against_raw" rows, "blog_comparison"),
    the run's own image-only comparison from its results.json ("reported_image_only"), where
    `sa` does not carry one already. Returns sa."""
    for probe, by_row in sa.get("against_raw", {}).items():
        for row, s in by_row.items():
            s.setdefault(
                "reported_image_only", image_only_comparison(results, "against_raw", probe, row)
            )
    for label, s in sa.get("blog_comparison", {}).items():
        s.setdefault(
            "reported_image_only", image_only_comparison(results, "blog_comparison", label)
        )
    return sa


def load_runs(root: str | Path, runs: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{run: seed-aware statistics} for the runs under root that have them (seed_aware.json,
    else results.json's "seed_aware"), in the order of `runs` (default: reanalyse.RUNS)."""
    root = Path(root)
    out = {}
    for run in runs or [r for r, _ in RUNS]:
        side = root / run / "seed_aware.json"
        if side.exists():
            out[run] = json.loads(side.read_text(encoding="utf-8"))
            continue
        res = root / run / "results.json"
        if res.exists():
            results = json.loads(res.read_text(encoding="utf-8"))
            sa = results.get("seed_aware")
            if sa:
                out[run] = attach_image_only(sa, results)
    return out


def _probes(stats: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    return [(k, t) for k, t in VERDICT_PROBES if any(k in s["against_raw"] for s in stats.values())]


def _n_seeds(sa: dict[str, Any]) -> int:
    return len(sa["method"]["seeds"])


def verdict_table(stats: dict[str, dict[str, Any]], runs: list[str] | None = None) -> str:
    """The verdict's one table: main rows × probes down, runs across; each cell the mean
    difference from the raw features in points, its two-level interval and the marks of
    report.seed_aware_cell (no p-values, for width)."""
    runs = [r for r in (runs or VERDICT_RUNS) if r in stats]
    probes = _probes({r: stats[r] for r in runs})
    head = (
        "| row | probe | "
        + " | ".join(f"{_label(r)} ({_n_seeds(stats[r])} seeds)" for r in runs)
        + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for row, title in MAIN_ROWS:
        for probe, ptitle in probes:
            cells = [
                seed_aware_cell(stats[r]["against_raw"].get(probe, {}).get(row), p=False)
                for r in runs
            ]
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| {title} | {ptitle} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def before_after_table(
    stats: dict[str, dict[str, Any]], runs: list[str] | None = None, probes=("tuned", "blog")
) -> str:
    """The main rows' earlier image-only intervals against the two-level ones, per run."""
    runs = [r for r in (runs or ["digits-d128", "cifar10-subset"]) if r in stats]
    lines = [
        "| run | row | probe | earlier: Δ [images only] McNemar p (pooled) | "
        "two-level: Δ [seeds × images] t-test p | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row, title in MAIN_ROWS:
            for probe in probes:
                s = stats[run]["against_raw"].get(probe, {}).get(row)
                if s is None:
                    continue
                r = s.get("reported_image_only")
                old = (
                    "–"
                    if not r
                    else (
                        _minus(f"{r['diff']:+.1f} [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}]")
                        + f" p={r['p_mcnemar_pooled']:.2g}"
                    )
                )
                per = _minus(", ".join(f"{v:+.1f}" for v in s["per_seed_diff"]))
                lines.append(
                    f"| {_label(run)} | {title} | {probe} | {old} | {seed_aware_cell(s)} | {per} |"
                )
    return "\n".join(lines)


FAITHFUL_ROWS = [
    ("flow: blog preset", "blog", "blog flow, blog LR"),
    ("scale control", "blog", "scale control (raw × flowed mean norm), blog LR"),
    ("flow: blog preset", "tuned", "blog flow, tuned probe"),
    ("flow: blog preset, to plateau", "tuned", "blog flow trained to plateau, tuned probe"),
]


def faithful_table(stats: dict[str, dict[str, Any]]) -> str:
    """Digits at 128-d, the default run against --faithful, seed-aware (BLOG_FAITHFULNESS)."""
    runs = [r for r in ("digits", "digits/faithful") if r in stats]
    lines = [
        "| comparison | "
        + " | ".join("default" if r == "digits" else "`--faithful`" for r in runs)
        + " |",
        "|---|" + "---|" * len(runs),
    ]
    for row, probe, title in FAITHFUL_ROWS:
        lines.append(
            f"| {title} | "
            + " | ".join(
                seed_aware_cell(stats[r]["against_raw"].get(probe, {}).get(row)) for r in runs
            )
            + " |"
        )
    for label, title in (
        (PLUS3[2], "blog LR on flowed features − encoder head (the blog's comparison)"),
        (PLUS3[0], "blog LR on raw features − encoder head"),
    ):
        lines.append(
            f"| {title} | "
            + " | ".join(
                seed_aware_cell((stats[r].get("blog_comparison") or {}).get(label)) for r in runs
            )
            + " |"
        )
    return "\n".join(lines)


def _plus3_parts(sa: dict[str, Any]) -> dict[str, Any] | None:
    blog = sa.get("blog_comparison") or {}
    if sa.get("head_test") is None or not all(k in blog for k in PLUS3):
        return None
    head = float(np.mean(sa["head_test"]))
    raw, flow, total = (blog[k] for k in PLUS3)
    return {"head": head, "raw": raw, "flow": flow, "total": total}


def plus3_table(stats: dict[str, dict[str, Any]], runs: list[str] | None = None) -> str:
    """The blog's "+3" taken apart, per run: the head's accuracy, logistic regression on the
    raw features against the head, the flow's own share (flowed against raw, same classifier),
    and the blog's comparison (flowed against the head)."""
    runs = [r for r in (runs or VERDICT_RUNS) if r in stats]
    lines = [
        "| run | encoder head (test %) | LR on raw − head | LR on flowed − LR on raw "
        "(the flow's share) | LR on flowed − head (the blog's comparison) |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        p = _plus3_parts(stats[run])
        if p is None:
            continue
        lines.append(
            f"| {_label(run)} | {p['head']:.1f} | {seed_aware_cell(p['raw'])} | "
            f"{seed_aware_cell(p['flow'])} | {seed_aware_cell(p['total'])} |"
        )
    return "\n".join(lines)


def plot_forest(
    stats: dict[str, dict[str, Any]], path: str | Path, runs: list[str] | None = None
) -> None:
    """One panel per probe: every main row × run as its mean difference from the raw features
    with the two-level 95% interval; filled markers significant after the correction, the
    primary comparison ringed."""
    plt = pyplot()
    runs = [r for r in (runs or VERDICT_RUNS) if r in stats]
    probes = _probes({r: stats[r] for r in runs})
    if not probes:
        return
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(
        1, len(probes), figsize=(5.2 * len(probes), 6.5), sharey=True, squeeze=False
    )
    n_runs = len(runs)
    for ax, (probe, ptitle) in zip(axes[0], probes):
        for i, (row, _title) in enumerate(MAIN_ROWS):
            for j, run in enumerate(runs):
                s = stats[run]["against_raw"].get(probe, {}).get(row)
                if s is None:
                    continue
                y = -(i * (n_runs + 1) + j)
                lo, hi = s["ci95"]
                c = colours[j % len(colours)]
                ax.plot([lo, hi], [y, y], color=c, lw=1.6)
                ax.plot(
                    [s["mean_diff"]],
                    [y],
                    "o",
                    color=c,
                    ms=5,
                    mfc=c if s.get("significant") else "white",
                    label=_label(run) if i == 0 else None,
                )
                if s.get("primary"):
                    ax.plot([s["mean_diff"]], [y], "o", ms=12, mfc="none", mec="black", mew=1.2)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(ptitle)
        ax.set_xlabel("Δ accuracy vs raw features (points)")
        ax.grid(axis="x", alpha=0.3)
    ticks = [-(i * (n_runs + 1) + (n_runs - 1) / 2) for i in range(len(MAIN_ROWS))]
    axes[0][0].set_yticks(ticks)
    axes[0][0].set_yticklabels([t for _, t in MAIN_ROWS])
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save_png(
        plt,
        fig,
        Path(path),
        "Every flow against the raw features: mean over seeds, "
        "two-level 95% interval\n(filled: significant after correction; ringed: the "
        "primary comparison)",
    )


def plot_plus3(
    stats: dict[str, dict[str, Any]], path: str | Path, runs: list[str] | None = None
) -> None:
    """The blog's "+3" as a waterfall per run: the encoder head's test accuracy, the step to
    the default LogisticRegression() on the raw features, the step from raw to blog-flowed
    features; each step with its two-level 95% interval."""
    plt = pyplot()
    runs = [
        r
        for r in (runs or ["digits-d128", "cifar10-subset"])
        if r in stats and _plus3_parts(stats[r]) is not None
    ]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        p = _plus3_parts(stats[run])
        head, d1, d2 = p["head"], p["raw"]["mean_diff"], p["flow"]["mean_diff"]
        bottoms = [0, head, head + d1]
        heights = [head, d1, d2]
        labels = [
            "encoder head\n(its own linear layer)",
            "LogisticRegression()\non raw features",
            "LogisticRegression()\non blog-flowed",
        ]
        colours = ["#999999", "#1f77b4", "#d62728"]
        for k in range(3):
            b, h = bottoms[k], heights[k]
            ax.bar(
                k,
                abs(h) if k else h,
                bottom=(b if h >= 0 or not k else b + h),
                color=colours[k],
                width=0.6,
            )
        for k, step in ((1, p["raw"]), (2, p["flow"])):
            lo, hi = step["ci95"]
            base = bottoms[k]
            ax.errorbar(
                k,
                base + step["mean_diff"],
                yerr=[[step["mean_diff"] - lo], [hi - step["mean_diff"]]],
                color="black",
                capsize=4,
                lw=1,
            )
            ax.annotate(
                _minus(f"{step['mean_diff']:+.1f}\n[{lo:+.1f}, {hi:+.1f}]"),
                (k, base + max(hi, step["mean_diff"])),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
        ax.annotate(
            f"{head:.1f}%",
            (0, head),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
        top = head + max(0, d1) + max(0, d2) + max(p["raw"]["ci95"][1], 0) + 2
        ax.set_ylim(head - 8, top + 1.5)
        ax.set_xticks(range(3))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("test accuracy (%), mean over seeds")
        t = p["total"]
        ax.set_title(
            f"{_label(run)} ({_n_seeds(stats[run])} seeds)\nthe blog's comparison, "
            + _minus(
                f"flowed LR − head: {t['mean_diff']:+.1f} "
                f"[{t['ci95'][0]:+.1f}, {t['ci95'][1]:+.1f}]"
            ),
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
    save_png(plt, fig, Path(path), 'The blog\'s "+3": head → LR on raw → LR on flowed')


def _replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(
        rf"(<!-- generated:{re.escape(name)} -->\n).*?(<!-- /generated:"
        rf"{re.escape(name)} -->)",
        re.S,
    )
    if not pat.search(text):
        raise ValueError(
            f"the page has no block <!-- generated:{name} --> … <!-- /generated:{name} -->"
        )
    return pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def render_page(
    root: str | Path,
    page: str | Path,
    repo: str | Path = ".",
    runs: list[str] | None = None,
    pages: list[str | Path] = (),
) -> None:
    """Fills the page's generated blocks (verdict-table, plus3-table, before-after) from the
    runs under root, and draws the forest plot and the "+3" figure (paths FOREST_PNG and
    PLUS3_PNG under repo). pages: further files whose generated blocks of the same names
    (and "faithful-table") are filled too. runs: those to read (default reanalyse.RUNS)."""
    stats = load_runs(root, runs)
    blocks = {
        "verdict-table": verdict_table(stats),
        "plus3-table": plus3_table(stats),
        "before-after": before_after_table(stats),
        "faithful-table": faithful_table(stats),
    }
    for path in [Path(page), *map(Path, pages)]:
        text = path.read_text(encoding="utf-8")
        for name, body in blocks.items():
            if f"<!-- generated:{name} -->" in text:
                text = _replace_block(text, name, body)
        atomic_write_text(path, text)
    for png, plot in ((FOREST_PNG, plot_forest), (PLUS3_PNG, plot_plus3)):
        (Path(repo) / png).parent.mkdir(parents=True, exist_ok=True)
        plot(stats, Path(repo) / png)
