"""Seed-aware statistics of the study: paired differences between two rows of the experiment
over seeds and test images, and the multiplicity correction (docs/DESIGN.md, "Statistics of
the study").

The unit of replication is the seed: the encoder, the field and the probe all change with it.
The test images are the same in every seed. A row's difference from the raw features therefore
varies with the seed and with the draw of test images, and the images' share of it recurs in
every seed. `paired_summary` gives both sources their due:

- the interval is a two-level bootstrap over the crossed design: seeds drawn with replacement,
  and one draw of test images with replacement shared by all the drawn seeds (the images are
  crossed with the seeds, not nested in them; `scheme="nested"` draws the images anew for every
  drawn seed, for comparison);
- the p-value is the paired t-test over the per-seed differences (n_seeds − 1 degrees of
  freedom), which is what the tables' significance marks use;
- McNemar's exact test per seed, for the reader who wants the per-seed picture.

`benjamini_hochberg` adjusts a family of p-values; `mark_significance` applies the study's rule:
the declared primary comparison tested alone at alpha, every other comparison after
Benjamini-Hochberg over the rest.

numpy and scipy only; nothing here imports torch or the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "paired_summary",
    "benjamini_hochberg",
    "mark_significance",
    "PRIMARY",
    "bootstrap_differences",
    "mcnemar_exact",
    "ttest_over_seeds",
    "family",
]

# The primary comparison, declared before the protocol re-run (docs/DESIGN.md, "Statistics of
# the study"): (results folder, row, probe), the row against the raw features.
PRIMARY = ("cifar10-subset", "flow: blog preset", "tuned")


def _matrix(correct: Sequence[np.ndarray], name: str) -> np.ndarray:
    rows = [np.asarray(c) for c in correct]
    if not rows:
        raise ValueError(f"{name} holds no seed")
    if any(r.ndim != 1 for r in rows) or len({r.size for r in rows}) != 1 or rows[0].size == 0:
        raise ValueError(
            f"{name}: every seed must be a 1-D vector over the same non-empty set "
            f"of test images, got shapes {[r.shape for r in rows]}"
        )
    for r in rows:
        if r.dtype != bool and not np.isin(r, (0, 1)).all():
            raise ValueError(f"{name}: per-image correctness must be boolean (or 0/1)")
    return np.stack([r.astype(bool) for r in rows])


def bootstrap_differences(
    d: np.ndarray, *, n_boot: int = 10000, seed: int = 0, scheme: str = "crossed", chunk: int = 500
) -> np.ndarray:
    """Bootstrap replicates of the mean over seeds of the per-seed mean of d.

    d: (n_seeds, n_images), the per-image difference (row correct − raw correct) of each seed.
    scheme "crossed": each replicate draws n_seeds seeds with replacement and one set of n_images
    images with replacement, used for every drawn seed. "nested": each drawn seed gets its own
    draw of images. "images": the seeds kept fixed, images drawn independently per seed (the
    earlier image-only interval, for before/after comparisons). Returns n_boot replicates, in
    the units of d (fractions)."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"d must be (n_seeds, n_images), got shape {d.shape}")
    if scheme not in ("crossed", "nested", "images"):
        raise ValueError(f"scheme must be 'crossed', 'nested' or 'images', got {scheme!r}")
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    r, n = d.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        if scheme == "crossed":
            seeds = rng.integers(0, r, size=(b, r))
            images = rng.integers(0, n, size=(b, n))
            per_seed = d[:, images].mean(-1)  # (r, b): each seed, each draw
            picked = np.take_along_axis(per_seed.T, seeds, axis=1)  # (b, r)
            out[start : start + b] = picked.mean(1)
        elif scheme == "nested":
            seeds = rng.integers(0, r, size=(b, r))
            images = rng.integers(0, n, size=(b, r, n))
            out[start : start + b] = d[seeds[..., None], images].mean(-1).mean(-1)
        else:
            images = rng.integers(0, n, size=(b, r, n))
            out[start : start + b] = d[np.arange(r)[None, :, None], images].mean(-1).mean(-1)
    return out


def mcnemar_exact(correct_row: np.ndarray, correct_raw: np.ndarray) -> float:
    """Two-sided exact binomial McNemar p-value: the images the row alone gets right against
    those the raw features alone get right, at 1/2. 1.0 without discordant images."""
    from scipy.stats import binomtest

    a = np.asarray(correct_raw, dtype=bool)
    b = np.asarray(correct_row, dtype=bool)
    n10 = int((b & ~a).sum())
    n01 = int((a & ~b).sum())
    if n10 + n01 == 0:
        return 1.0
    return float(binomtest(n10, n10 + n01, 0.5).pvalue)


def ttest_over_seeds(diffs: Sequence[float]) -> tuple[float | None, float | None]:
    """(t, two-sided p) of the one-sample t-test of the per-seed differences against 0 (the
    paired t-test of the two rows' per-seed accuracies). Defined without NaN where scipy's is
    not: with one seed (None, None); with every difference equal, p = 1.0 when they are 0 and
    0.0 otherwise (t = ±inf, reported as None)."""
    from scipy.stats import ttest_1samp

    x = np.asarray(diffs, dtype=np.float64)
    if x.size < 2:
        return None, None
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return None, (1.0 if abs(float(x.mean())) <= 1e-12 else 0.0)
    res = ttest_1samp(x, 0.0)
    return float(res.statistic), float(res.pvalue)


def paired_summary(
    correct_row: Sequence[np.ndarray],
    correct_raw: Sequence[np.ndarray],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    scheme: str = "crossed",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """A row against the raw features (or any two rows), seed-aware.

    correct_row[s], correct_raw[s]: per test image, whether seed s's row and seed s's raw
    features classified it correctly; the same images in the same order in every seed.

    Returns a JSON-ready dict, differences in points (percentage points of accuracy):
    mean_diff (mean over seeds of the per-seed accuracy differences), ci95 ([lo, hi], percentile
    interval of the two-level bootstrap, `scheme` as in `bootstrap_differences`), ci95_t (the
    t-interval over the seeds), t_stat and t_p (paired t-test over the per-seed differences,
    two-sided; see `ttest_over_seeds` for the degenerate cases), per_seed_diff,
    mcnemar_p_per_seed (exact binomial McNemar of each seed), n_seeds, n_images, n_boot,
    bootstrap_seed and scheme."""
    row = _matrix(correct_row, "correct_row")
    raw = _matrix(correct_raw, "correct_raw")
    if row.shape != raw.shape:
        raise ValueError(
            f"correct_row and correct_raw differ in shape: {row.shape} and "
            f"{raw.shape} (seeds, images)"
        )
    d = row.astype(np.int8) - raw.astype(np.int8)
    per_seed = d.mean(1)
    boot = bootstrap_differences(d, n_boot=n_boot, seed=seed, scheme=scheme)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    t, p = ttest_over_seeds(per_seed)
    r = per_seed.size
    if r > 1:
        from scipy.stats import t as t_dist

        half = float(t_dist.ppf(1 - alpha / 2, r - 1) * per_seed.std(ddof=1) / math.sqrt(r))
        ci_t = [100 * (float(per_seed.mean()) - half), 100 * (float(per_seed.mean()) + half)]
    else:
        ci_t = None
    return {
        "mean_diff": 100 * float(per_seed.mean()),
        "ci95": [100 * float(lo), 100 * float(hi)],
        "ci95_t": ci_t,
        "t_stat": t,
        "t_p": p,
        "per_seed_diff": [100 * float(v) for v in per_seed],
        "mcnemar_p_per_seed": [mcnemar_exact(row[s], raw[s]) for s in range(r)],
        "n_seeds": int(r),
        "n_images": int(d.shape[1]),
        "n_boot": int(n_boot),
        "bootstrap_seed": int(seed),
        "scheme": scheme,
    }


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg adjusted p-values, in the input's order: p_(i) · m / i made monotone
    from the largest down and capped at 1. None or NaN entries stay None and do not count in m."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(float(p))]
    out: list[float | None] = [None] * len(pvalues)
    if not idx:
        return out
    p = np.array([float(pvalues[i]) for i in idx])
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    for rank, j in enumerate(order):
        out[idx[j]] = float(adjusted[rank])
    return out


def _interval_excludes_zero(summary: Mapping[str, Any]) -> bool:
    ci = summary.get("ci95")
    return ci is None or not (ci[0] <= 0.0 <= ci[1])


def mark_significance(
    results: Mapping[Any, Mapping[str, Any]],
    primary: Any = None,
    alpha: float = 0.05,
    p_key: str = "t_p",
    require_interval: bool = True,
) -> dict[Any, dict[str, Any]]:
    """The study's significance rule over a family of comparisons.

    results: {key: summary} with summaries as returned by `paired_summary` (any mapping with a
    p-value under `p_key`); key is whatever names a comparison, e.g. (data set, row, probe).
    primary: the key of the declared primary comparison (absent from results: no primary).
    The primary comparison is tested alone at alpha; the others are adjusted together by
    Benjamini-Hochberg and tested at alpha. require_interval: a comparison is significant only
    if, besides, its two-level interval ("ci95", at the same alpha) excludes 0: the t-test over
    seeds holds the test images fixed and the interval lets them vary, so the mark needs both
    (docs/DESIGN.md, "Statistics of the study"). Returns {key: summary + {"primary": bool,
    "p_adjusted": float | None (the primary's own p), "significant": bool}}; a comparison
    without a p-value is never significant. The input is not modified."""
    out: dict[Any, dict[str, Any]] = {}
    rest = [k for k in results if k != primary]
    adjusted = benjamini_hochberg([results[k].get(p_key) for k in rest])
    for k, adj in zip(rest, adjusted):
        out[k] = {
            **results[k],
            "primary": False,
            "p_adjusted": adj,
            "significant": adj is not None
            and adj < alpha
            and (not require_interval or _interval_excludes_zero(results[k])),
        }
    if primary in results:
        p = results[primary].get(p_key)
        ok = p is not None and not math.isnan(float(p))
        out[primary] = {
            **results[primary],
            "primary": True,
            "p_adjusted": p if ok else None,
            "significant": ok
            and float(p) < alpha
            and (not require_interval or _interval_excludes_zero(results[primary])),
        }
    return {k: out[k] for k in results}


def family(
    summaries: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    """Flattens {run: {probe: {row: summary}}} into {(run, row, probe): summary}, the keys
    `mark_significance` and `PRIMARY` use."""
    return {
        (run, row, probe): s
        for run, probes in summaries.items()
        for probe, rows in probes.items()
        for row, s in rows.items()
    }
