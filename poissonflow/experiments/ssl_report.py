"""The self-supervised study's outputs: the summary over seeds, results.md, the plots
(alignment against uniformity, the s curve) and re-rendering from a results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rows import RAW_ROW
from .summary import _stats

PROBE_KEYS = (
    "blog",
    "tuned",
    "blog_converged",
    "knn20",
    "knn",
    "labels1perclass",
    "labels10perclass",
)


# --------------------------------------------------------------------------- summary


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
                e[f"delta {p}"] = _stats(
                    [r["rows"][row][p]["test"] - r["rows"][RAW_ROW][p]["test"] for r in recs]
                )
            for m in ("alignment", "uniform_loss", "wasserstein_uniformity", "effective_rank"):
                e[m] = _stats([r["rows"][row]["metrics"].get(m) for r in recs])
            e["tuned val"] = _stats([r["rows"][row]["tuned"].get("val") for r in recs])
            entry[row] = e
        # the row is chosen on validation (the tuned probe's validation accuracy, mean over
        # seeds; ties: the earlier row), never on test; its test accuracy is reported
        best = max(rows, key=lambda row: (entry[row]["tuned val"] or {"mean": -1.0})["mean"])
        entry["_best"] = {
            "row": best,
            "probe": "tuned",
            **entry[best]["tuned"],
            "chosen_by": "tuned probe's validation accuracy",
        }
        entry["_train_seconds"] = _stats([r["train_seconds"] for r in recs])
        entry["_rows_seconds"] = _stats([r["rows"][row]["seconds"] for r in recs for row in rows])
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
        lines = [
            f"# align + Riesz: s validation only, {results['dataset']['name']}",
            "",
            f"{cfg['epochs']} epochs of batch {cfg['batch_size']}, Adam lr 1e-3, seed 0; "
            f"augmentation {results['augmentation']}. Command: `{results['command']}`.",
            "",
        ]
        sv = results.get("s_validation")
        lines += [
            f"Uniformity weight {cfg.get('riesz_weight', 1.0):g}, bank {cfg['bank_size']}; "
            f"{sv['n_fit']} images to train, {sv['n_val']} to validate; best s = "
            f"**{sv['chosen_s']:g}**.",
            "",
            "| s | val tuned | val k-NN 20 | alignment | uniform_loss | W2 |",
            "|---|---|---|---|---|---|",
        ]
        for p in sv["points"] + [dict(sv["reference_align_uniform"], s="align_uniform")]:
            s = p["s"] if isinstance(p["s"], str) else f"{p['s']:g}"
            lines.append(
                f"| {s} | {100 * p['val_tuned']:.1f} | {100 * p['val_knn20']:.1f} | "
                f"{p['alignment']:.3f} | {p['uniform_loss']:.3f} | "
                f"{p['wasserstein_uniformity']:.3f} |"
            )
        return "\n".join(lines + [""])
    lines = [
        f"# Self-supervised encoders on {results['dataset']['name']}",
        "",
        f"{results['dataset']['n_train']} train / {results['dataset']['n_test']} test "
        f"images; SmallAlexNet ({'digits' if cfg['dataset'] == 'digits' else 'blog'} "
        f"widths), {cfg['epochs']} epochs of batch {cfg['batch_size']}, Adam lr 1e-3, "
        f"seeds {cfg['seeds']}; augmentation {results['augmentation']}. "
        f"Accuracies in % (mean ± standard deviation over the {n_seeds} seeds); "
        f"metrics on the L2-normalised test features (alignment on two augmented views "
        f"of each test image). Command: `{results['command']}`.",
        ""
        if results["complete"]
        else "\n**Incomplete: the run is still going or was stopped; the seeds done so far.**",
        "",
    ]
    sv = results.get("s_validation")
    if sv:
        lines += [
            "## Riesz exponent s, chosen on a validation split",
            "",
            f"align + Riesz (uniformity weight {cfg.get('riesz_weight', 1.0):g}, bank "
            f"{cfg['bank_size']}), seed 0, trained on {sv['n_fit']} train images, "
            f"probed on the "
            f"other {sv['n_val']} (test set unused); chosen s = **{sv['chosen_s']:g}** "
            f"({sv['criterion']}).",
            "",
            "| s | val tuned | val k-NN 20 | alignment | uniform_loss | W2 |",
            "|---|---|---|---|---|---|",
        ]
        for p in sv["points"]:
            lines.append(
                f"| {p['s']:g} | {100 * p['val_tuned']:.1f} | {100 * p['val_knn20']:.1f}"
                f" | {p['alignment']:.3f} | {p['uniform_loss']:.3f} | "
                f"{p['wasserstein_uniformity']:.3f} |"
            )
        ref = sv.get("reference_align_uniform")
        if ref:
            lines.append(
                f"| align_uniform (reference) | {100 * ref['val_tuned']:.1f} | "
                f"{100 * ref['val_knn20']:.1f} | {ref['alignment']:.3f} | "
                f"{ref['uniform_loss']:.3f} | {ref['wasserstein_uniformity']:.3f} |"
            )
        lines.append("")
    elif results.get("riesz_s") is not None:
        lines += [f"Riesz exponent s = {results['riesz_s']:g} (given).", ""]
    wv = results.get("weight_validation") or {}
    if wv:
        lines += [
            "## Uniformity weights, chosen on the validation split",
            "",
            "Each weight's encoder trained on seed 0's fit images, probed on its validation "
            "images (align_riesz at the chosen s; ties: the smaller weight).",
            "",
            "| objective | weight | val tuned | val k-NN 20 | uniform_loss | W2 | chosen |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, v in wv.items():
            for p in v["points"]:
                lines.append(
                    f"| {name} | {p['weight']:g} | {100 * p['val_tuned']:.1f} | "
                    f"{100 * p['val_knn20']:.1f} | {p['uniform_loss']:.3f} | "
                    f"{p['wasserstein_uniformity']:.3f} | "
                    f"{'**yes**' if p['weight'] == v['chosen'] else ''} |"
                )
        lines.append("")
    lines += [
        "## The row validation chooses, per encoder",
        "",
        "The row with the best tuned-probe validation accuracy (mean over seeds; the test set "
        "is not looked at), its tuned test accuracy; the raw "
        "features' tuned probe beside it; training wall time per encoder (one thread).",
        "",
        "| encoder | chosen row | probe | test accuracy | raw, tuned | raw alignment | "
        "raw uniform_loss | raw W2 | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summ.items():
        b, raw = e["_best"], e[RAW_ROW]
        lines.append(
            f"| {name} | {b['row']} | {b['probe']} | {_pct(b)} | {_pct(raw['tuned'])}"
            f" | {_num(raw['alignment'])} | {_num(raw['uniform_loss'])} | "
            f"{_num(raw['wasserstein_uniformity'])} | "
            f"{e['_train_seconds']['mean']:.0f} |"
        )
    lines += [
        "",
        "## Every row",
        "",
        "Test accuracy of each probe; in brackets the mean per-seed difference to the "
        "raw features (points).",
        "",
    ]
    # results of the earlier protocol hold "labels1%" (1% of the labels) instead
    low = next(
        (
            p
            for p in ("labels1perclass", "labels1%")
            if all(p in e[row] for e in summ.values() for row in rows)
        ),
        None,
    )
    head = (
        "| encoder | row | blog LR | tuned | k-NN 20 | "
        + ("1 label a class" if low == "labels1perclass" else "1% labels")
        + " | alignment | uniform_loss | W2 |"
    )
    lines += [head, "|" + "---|" * 9]
    for name, e in summ.items():
        for row in rows:
            r = e[row]
            cells = []
            for p in ("blog", "tuned", "knn20", low):
                d = "" if row == RAW_ROW else f" ({100 * r['delta ' + p]['mean']:+.1f})"
                cells.append(_pct(r[p]) + d)
            lines.append(
                f"| {name} | {row} | "
                + " | ".join(cells)
                + f" | {_num(r['alignment'])} | {_num(r['uniform_loss'])} | "
                f"{_num(r['wasserstein_uniformity'])} |"
            )
    seed_aware = results.get("seed_aware") or {}
    if seed_aware:
        from .report import seed_aware_markdown

        lines += ["", "## Seed-aware comparisons with the raw features (the analysis)"]
        for name, sa in seed_aware.items():
            lines += ["", f"### {name}", "", seed_aware_markdown(sa, heading=False)]
    paired = results.get("paired", {})
    if paired:
        lines += [
            "",
            "## Paired against the raw features (pooled over seeds; the earlier, image-only "
            "analysis)",
            "",
            "Difference in points, bootstrap 95% interval resampling images within each seed, "
            "exact McNemar p pooled over seeds (`probes.paired_comparison`): kept for "
            "comparison, not for significance claims (the seed-aware tables above are the "
            "analysis).",
            "",
            "| encoder | row | tuned | blog LR | k-NN 20 |",
            "|---|---|---|---|---|",
        ]
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
    lines += [
        "",
        f"Wall time of this invocation: {results['seconds']:.0f} s "
        f"(cached encoders and rows are not retrained).",
        "",
    ]
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
    low = (
        "labels1perclass"
        if "labels1perclass" in by[("align_riesz", seeds[0])]["rows"][RAW_ROW]
        else "labels1%"
    )
    for p in ("tuned", "blog", "knn20", low):
        diffs = [
            by[("align_riesz", s)]["rows"][RAW_ROW][p]["test"]
            - by[("align_uniform", s)]["rows"][RAW_ROW][p]["test"]
            for s in seeds
        ]
        st = _stats(diffs)
        out[p] = {"per_seed": diffs, **st}
        parts.append(
            f"{p}: {100 * st['mean']:+.1f} ± {100 * st['std']:.1f} "
            f"(per seed {', '.join(f'{100 * d:+.1f}' for d in diffs)})"
        )
    out["text"] = (
        "Raw features, align_riesz minus align_uniform, points, mean ± std over "
        f"seeds {seeds}: " + "; ".join(parts) + "."
    )
    return out


def plot(results: dict[str, Any], out_dir: Path) -> None:
    from .report import pyplot, save_png

    plt = pyplot()
    summ = results["summary"]
    rows = results["config"]["rows"]
    cs = [100 * e[row]["tuned"]["mean"] for e in summ.values() for row in rows]
    if cs:
        _plot_alignment_uniformity(plt, save_png, results, summ, rows, out_dir, min(cs), max(cs))
    _plot_s_curve(plt, save_png, results.get("s_validation"), out_dir)


def _plot_alignment_uniformity(plt, save_png, results, summ, rows, out_dir, lo, hi):
    markers = dict(zip(rows, "o^sDvP*X"))
    fig, ax = plt.subplots(figsize=(8.5, 6))
    sc = None
    for e in summ.values():  # a faint line from each encoder's raw point to its rows
        raw = e[RAW_ROW]
        for row in rows[1:]:
            r = e[row]
            if raw["alignment"] is not None and r["alignment"] is not None:
                ax.plot(
                    [raw["uniform_loss"]["mean"], r["uniform_loss"]["mean"]],
                    [raw["alignment"]["mean"], r["alignment"]["mean"]],
                    color="0.8",
                    lw=0.6,
                    zorder=0,
                )
    for name, e in summ.items():
        for row in rows:
            r = e[row]
            if r["alignment"] is None:
                continue
            sc = ax.scatter(
                [r["uniform_loss"]["mean"]],
                [r["alignment"]["mean"]],
                c=[100 * r["tuned"]["mean"]],
                marker=markers[row],
                s=70,
                cmap="viridis",
                vmin=lo,
                vmax=hi,
                edgecolors="k",
                linewidths=0.4,
            )
            if row == RAW_ROW:
                ax.annotate(
                    name,
                    (r["uniform_loss"]["mean"], r["alignment"]["mean"]),
                    fontsize=8,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    for row in rows:
        ax.scatter([], [], marker=markers[row], c="w", edgecolors="k", label=row)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("uniformity  log E exp(-2 |u - v|^2)  (lower: more uniform)")
    ax.set_ylabel("alignment  E |f(x) - f(x+)|^2  (lower: better aligned)")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="tuned linear probe test accuracy (%)")
    save_png(
        plt,
        fig,
        out_dir / "alignment_uniformity.png",
        f"{results['dataset']['name']}: alignment vs uniformity (means over seeds)",
    )


def _plot_s_curve(plt, save_png, sv, out_dir):
    if sv:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
        s = [p["s"] for p in sv["points"]]
        ax[0].plot(s, [100 * p["val_tuned"] for p in sv["points"]], "o-", label="tuned")
        ax[0].plot(s, [100 * p["val_knn20"] for p in sv["points"]], "s--", label="k-NN 20")
        ref = sv.get("reference_align_uniform")
        if ref:
            ax[0].axhline(
                100 * ref["val_tuned"], color="C0", lw=0.8, ls=":", label="align_uniform, tuned"
            )
            ax[1].plot([ref["uniform_loss"]], [ref["alignment"]], "k*", label="align_uniform")
            ax[1].legend(fontsize=8)
        ax[0].set_xscale("log", base=2)
        if ref:  # axhline does not widen the limits
            lo, hi = ax[0].get_ylim()
            ax[0].set_ylim(min(lo, 100 * ref["val_tuned"] - 1), max(hi, 100 * ref["val_tuned"] + 1))
        ax[0].set_xlabel("Riesz s")
        ax[0].set_ylabel("validation accuracy (%)")
        ax[0].legend()
        ax[1].plot(
            [p["uniform_loss"] for p in sv["points"]], [p["alignment"] for p in sv["points"]], "o-"
        )
        for p in sv["points"]:
            ax[1].annotate(f"s={p['s']:g}", (p["uniform_loss"], p["alignment"]), fontsize=8)
        ax[1].set_xlabel("uniform_loss (val)")
        ax[1].set_ylabel("alignment (val)")
        save_png(
            plt,
            fig,
            out_dir / "s_validation.png",
            f"align + Riesz: s by validation (chosen s = {sv['chosen_s']:g})",
        )


def render(results: dict[str, Any], out_dir: Path) -> None:
    """results.md and the plots of the self-supervised study's results, in out_dir."""
    from .._io import atomic_write_text

    atomic_write_text(Path(out_dir) / "results.md", markdown(results))
    plot(results, Path(out_dir))


def rerender(results_json) -> None:
    """results.md and the plots again, beside a results.json of this driver."""
    import json

    path = Path(results_json)
    render(json.loads(path.read_text(encoding="utf-8")), path.parent)
