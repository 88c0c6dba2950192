"""The study's seed-aware statistics (poissonflow/experiments/stats.py) against independent
computations: scipy's t-test and binomial test, scipy's bootstrap, exact enumeration of a small
bootstrap, and Benjamini-Hochberg by hand."""

import itertools
import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from poissonflow.experiments import stats  # noqa: E402


def _seeds(rng, n_seeds, n_images, p_raw=0.7, shift=0.05):
    raw = [rng.random(n_images) < p_raw for _ in range(n_seeds)]
    row = [
        rng.random(n_images) < p_raw + shift * (k - n_seeds / 2) / n_seeds for k in range(n_seeds)
    ]
    return row, raw


def test_mean_per_seed_and_ttest_match_scipy():
    rng = np.random.default_rng(1)
    row, raw = _seeds(rng, 5, 300)
    out = stats.paired_summary(row, raw, n_boot=200, seed=0)
    acc_row = np.array([r.mean() for r in row])
    acc_raw = np.array([r.mean() for r in raw])
    np.testing.assert_allclose(out["per_seed_diff"], 100 * (acc_row - acc_raw), atol=1e-12)
    assert out["mean_diff"] == pytest.approx(100 * (acc_row - acc_raw).mean(), abs=1e-12)
    ref = scipy_stats.ttest_rel(acc_row, acc_raw)
    assert out["t_p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert out["t_stat"] == pytest.approx(ref.statistic, rel=1e-10)
    lo, hi = ref.confidence_interval(0.95)
    np.testing.assert_allclose(out["ci95_t"], [100 * lo, 100 * hi], rtol=1e-10)
    assert out["n_seeds"] == 5 and out["n_images"] == 300


def test_per_seed_values_of_the_cifar_plateau_row_give_their_t_test():
    # per-seed differences +1.1, +1.2, -0.1, -0.4, +1.2 (points) -> t-test p about 0.16
    assert stats.ttest_over_seeds([1.1, 1.2, -0.1, -0.4, 1.2])[1] == pytest.approx(0.16, abs=0.01)


def test_ttest_degenerate_cases_are_nan_free():
    assert stats.ttest_over_seeds([0.0, 0.0, 0.0]) == (None, 1.0)
    assert stats.ttest_over_seeds([0.5, 0.5]) == (None, 0.0)
    assert stats.ttest_over_seeds([0.5]) == (None, None)
    same = [np.array([True, False, True])] * 3
    out = stats.paired_summary(same, same, n_boot=50)
    assert out["t_p"] == 1.0 and out["ci95"] == [0.0, 0.0]
    assert out["mcnemar_p_per_seed"] == [1.0, 1.0, 1.0]
    assert all(v is None or math.isfinite(v) for v in out["ci95"] + [out["t_p"]])


def test_mcnemar_matches_binomtest():
    rng = np.random.default_rng(2)
    row, raw = _seeds(rng, 3, 200, shift=0.3)
    out = stats.paired_summary(row, raw, n_boot=10)
    for s in range(3):
        n10 = int((row[s] & ~raw[s]).sum())
        n01 = int((raw[s] & ~row[s]).sum())
        ref = scipy_stats.binomtest(n10, n10 + n01, 0.5).pvalue
        assert out["mcnemar_p_per_seed"][s] == pytest.approx(ref, rel=1e-12)


def _exact_crossed(d):
    """Every equally likely (seed draw, image draw) of the crossed bootstrap: the exact
    distribution of the replicate, as a sorted array with multiplicities."""
    r, n = d.shape
    vals = [
        d[np.ix_(s, i)].mean()
        for s in itertools.product(range(r), repeat=r)
        for i in itertools.product(range(n), repeat=n)
    ]
    return np.sort(np.array(vals))


def _exact_nested(d):
    r, n = d.shape
    per_seed_draws = {
        s: [d[s, list(i)].mean() for i in itertools.product(range(n), repeat=n)] for s in range(r)
    }
    vals = []
    for seeds in itertools.product(range(r), repeat=r):
        for combo in itertools.product(*(per_seed_draws[s] for s in seeds)):
            vals.append(np.mean(combo))
    return np.sort(np.array(vals))


@pytest.mark.parametrize("scheme,exact", [("crossed", _exact_crossed), ("nested", _exact_nested)])
def test_two_level_bootstrap_matches_exact_enumeration(scheme, exact):
    # 2 seeds x 4 images: 4 seed draws x 256 image draws (crossed) enumerated exactly
    d = np.array([[1, 0, -1, 1], [0, 1, 1, 0]], dtype=np.int8)
    ref = exact(d)
    boot = stats.bootstrap_differences(d, n_boot=40000, seed=3, scheme=scheme)
    assert boot.mean() == pytest.approx(ref.mean(), abs=0.01)
    assert boot.std() == pytest.approx(ref.std(), rel=0.02)
    for q in (0.025, 0.25, 0.5, 0.75, 0.975):
        # the replicates take few values: compare distribution functions at the quantile
        x = np.quantile(ref, q)
        assert np.mean(boot <= x) == pytest.approx(np.mean(ref <= x), abs=0.01)


def test_crossed_bootstrap_keeps_the_images_shared_by_the_seeds():
    # identical seeds: the crossed replicate is one image draw's mean, its spread that of a
    # single seed's image bootstrap; nested draws average r independent draws (narrower)
    rng = np.random.default_rng(4)
    one = rng.integers(-1, 2, size=400).astype(np.int8)
    d = np.stack([one] * 4)
    crossed = stats.bootstrap_differences(d, n_boot=4000, seed=0, scheme="crossed").std()
    nested = stats.bootstrap_differences(d, n_boot=4000, seed=0, scheme="nested").std()
    single = one.std() / math.sqrt(one.size)
    assert crossed == pytest.approx(single, rel=0.06)
    assert nested == pytest.approx(single / 2, rel=0.06)


def test_one_seed_interval_matches_scipy_bootstrap():
    rng = np.random.default_rng(5)
    row, raw = _seeds(rng, 1, 500, shift=0.1)
    out = stats.paired_summary(row, raw, n_boot=20000, seed=0)
    d = row[0].astype(float) - raw[0].astype(float)
    ref = scipy_stats.bootstrap(
        (d,), np.mean, n_resamples=20000, method="percentile", random_state=np.random.default_rng(9)
    ).confidence_interval
    np.testing.assert_allclose(out["ci95"], [100 * ref.low, 100 * ref.high], atol=0.35)


def test_fixed_seed_is_deterministic_and_seed_matters():
    rng = np.random.default_rng(6)
    row, raw = _seeds(rng, 4, 250)
    a = stats.paired_summary(row, raw, n_boot=500, seed=11)
    b = stats.paired_summary(row, raw, n_boot=500, seed=11)
    c = stats.paired_summary(row, raw, n_boot=500, seed=12)
    assert a == b
    assert a["ci95"] != c["ci95"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same non-empty"):
        stats.paired_summary([np.ones(3, bool), np.ones(4, bool)], [np.ones(3, bool)] * 2)
    with pytest.raises(ValueError, match="differ in shape"):
        stats.paired_summary([np.ones(3, bool)] * 2, [np.ones(3, bool)] * 3)
    with pytest.raises(ValueError, match="boolean"):
        stats.paired_summary([np.array([0, 2, 1])], [np.array([0, 1, 1])])


def test_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5; times m/i: 0.025, 0.025, 0.05, 0.05, 0.5;
    # running minimum from the top keeps them; back in the input's order:
    assert stats.benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    # monotone step: 0.02*3/2 = 0.03 > 0.025 = 0.025*3/3 -> both 0.025
    assert stats.benjamini_hochberg([0.02, 0.001, 0.025]) == pytest.approx([0.025, 0.003, 0.025])
    assert stats.benjamini_hochberg([0.9, 0.95]) == pytest.approx([0.95, 0.95])
    assert stats.benjamini_hochberg([None, 0.01, float("nan")]) == [None, 0.01, None]
    assert stats.benjamini_hochberg([]) == []


def test_benjamini_hochberg_against_a_reference_loop():
    rng = np.random.default_rng(7)
    p = rng.random(40) ** 3
    m = p.size
    ref = np.empty(m)
    for i in range(m):  # definition: min over j with p_j >= p_i of p_j m / rank_j
        ref[i] = min(1.0, min(p[j] * m / (np.sum(p <= p[j])) for j in range(m) if p[j] >= p[i]))
    np.testing.assert_allclose(stats.benjamini_hochberg(list(p)), ref, rtol=1e-12)


def test_mark_significance_primary_alone_rest_corrected():
    fam = {
        ("a", "r1", "tuned"): {"t_p": 0.04},
        ("a", "r2", "tuned"): {"t_p": 0.01},
        ("a", "r3", "tuned"): {"t_p": 0.03},
        ("a", "r4", "tuned"): {"t_p": None},
    }
    out = stats.mark_significance(fam, primary=("a", "r1", "tuned"))
    assert out[("a", "r1", "tuned")]["primary"] and out[("a", "r1", "tuned")]["significant"]
    # the rest, m = 2: 0.01 -> 0.02, 0.03 -> 0.03
    assert out[("a", "r2", "tuned")]["p_adjusted"] == pytest.approx(0.02)
    assert out[("a", "r3", "tuned")]["p_adjusted"] == pytest.approx(0.03)
    assert out[("a", "r2", "tuned")]["significant"] and out[("a", "r3", "tuned")]["significant"]
    assert not out[("a", "r4", "tuned")]["significant"]
    # without a primary, all four in one family: 0.04*3/3, 0.01*3/1, 0.03*3/2
    out = stats.mark_significance(fam, primary=None)
    assert [out[k]["p_adjusted"] for k in fam] == pytest.approx([0.04, 0.03, 0.04, None])
    assert list(out) == list(fam) and "primary" not in fam[("a", "r1", "tuned")]


def _fake_run(tmp_path, name="cifar10-subset", n_seeds=3, n_test=60):
    """A run folder as the experiment writes it: results.json (the parts reanalyse reads) and
    predictions.npz (report.write_predictions)."""
    import json

    from poissonflow.experiments.report import write_predictions

    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, n_test)
    rows = ["encoder head", "raw features", "flow: blog preset", "ZCA whitening"]
    preds = {}
    for s in range(n_seeds):

        def noisy(p_wrong):
            return np.where(rng.random(n_test) < p_wrong, (y + 1) % 3, y)

        preds[s] = (
            {
                "encoder head": {"head": noisy(0.4)},
                "raw features": {"blog": noisy(0.3), "tuned": noisy(0.3)},
                "flow: blog preset": {"blog": noisy(0.3), "tuned": noisy(0.35)},
                "ZCA whitening": {"blog": noisy(0.25), "tuned": noisy(0.3)},
            },
            y,
        )
    run = tmp_path / name
    write_predictions(preds, run)
    (run / "results.json").write_text(
        json.dumps(
            {
                "config": {},
                "dataset": {"name": name, "n_train": 1, "n_test": n_test},
                "per_seed": [{"seed": s, "rows": {r: {} for r in rows}} for s in range(n_seeds)],
                "summary": {},
            }
        )
    )
    return run, preds


def test_reanalyse_a_run_and_render_the_verdict(tmp_path):
    from poissonflow.experiments import reanalyse, verdict

    run, preds = _fake_run(tmp_path)
    out = reanalyse.reanalyse_run(run, n_boot=200)
    assert list(out["against_raw"]) == ["tuned", "blog"]
    assert list(out["against_raw"]["tuned"]) == ["flow: blog preset", "ZCA whitening"]
    prim = out["against_raw"]["tuned"]["flow: blog preset"]
    assert prim["primary"] and out["method"]["family_size"] == 3 + 3
    # the same numbers as paired_summary on the raw predictions
    ref = stats.paired_summary(
        [p[0]["flow: blog preset"]["tuned"] == p[1] for p in preds.values()],
        [p[0]["raw features"]["tuned"] == p[1] for p in preds.values()],
        n_boot=200,
    )
    assert {k: prim[k] for k in ref} == ref
    assert (run / "seed_aware.json").exists() and "| flow: blog preset |" in (
        run / "seed_aware.md"
    ).read_text()
    loaded = reanalyse.load_predictions(
        run, ["encoder head", "raw features", "flow: blog preset", "ZCA whitening"]
    )
    np.testing.assert_array_equal(
        loaded[1][0]["ZCA whitening"]["blog"], preds[1][0]["ZCA whitening"]["blog"]
    )
    runs = verdict.load_runs(tmp_path, ["cifar10-subset"])
    table = verdict.verdict_table(runs, ["cifar10-subset"])
    assert "| blog flow (200 epochs) | tuned probe |" in table
    assert verdict.plus3_table(runs, ["cifar10-subset"]).count("\n") == 2
    page = tmp_path / "page.md"
    page.write_text(
        "x\n<!-- generated:verdict-table -->\nold\n<!-- /generated:verdict-table -->\ny\n"
    )
    pytest.importorskip("matplotlib")
    verdict.render_page(tmp_path, page, repo=tmp_path, runs=["cifar10-subset"])
    text = page.read_text()
    assert "old" not in text and table in text and text.startswith("x\n") and text.endswith("y\n")
    assert (tmp_path / verdict.FOREST_PNG).exists() and (tmp_path / verdict.PLUS3_PNG).exists()


def test_significance_needs_the_interval_too():
    fam = {
        "a": {"t_p": 0.001, "ci95": [-0.2, 1.0]},
        "b": {"t_p": 0.001, "ci95": [0.1, 1.0]},
        "p": {"t_p": 0.01, "ci95": [-1.0, -0.1]},
        "q": {"t_p": 0.01, "ci95": [-1.0, 0.0]},
    }
    out = stats.mark_significance(fam, primary="p")
    assert not out["a"]["significant"] and out["b"]["significant"] and out["p"]["significant"]
    assert not out["q"]["significant"]
    out = stats.mark_significance(fam, primary="q", require_interval=False)
    assert out["a"]["significant"] and out["q"]["significant"]


_REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
_COMMITTED = [
    r
    for r, _ in __import__("poissonflow.experiments.reanalyse", fromlist=["RUNS"]).RUNS
    if (_REPO / "docs/results" / r / "seed_aware.json").exists()
]


@pytest.mark.parametrize("run", _COMMITTED)
def test_committed_intervals_match_a_recomputation(run):
    """The committed seed-aware statistics are what the code computes from the committed
    predictions (a sample of comparisons per run; `reanalyse --all --check` does them all)."""
    import json

    from poissonflow.experiments import reanalyse

    d = _REPO / "docs/results" / run
    committed = json.loads((d / "seed_aware.json").read_text())
    pairs = [(pr, row) for pr, rows in committed["against_raw"].items() for row in rows]
    only = [
        p
        for p in pairs
        if p in {("tuned", "flow: blog preset"), ("blog", "flow: PFGM preset, to plateau")}
    ] or pairs[:1]
    assert reanalyse.check_run(d, only=only) == []


def test_committed_primary_interval_against_an_independent_bootstrap():
    """The CIFAR subset's primary comparison, its interval recomputed by a plain loop with its
    own random stream (seeds drawn, then one image draw shared by the drawn seeds): equal
    within Monte-Carlo error."""
    import json

    from poissonflow.experiments import reanalyse

    d = _REPO / "docs/results/cifar10-subset"
    if not (d / "seed_aware.json").exists():
        pytest.skip("no committed seed-aware statistics")
    committed = json.loads((d / "seed_aware.json").read_text())["against_raw"]["tuned"][
        "flow: blog preset"
    ]
    preds = reanalyse.load_predictions(d)
    diff = np.stack(
        [
            (rows["flow: blog preset"]["tuned"] == y).astype(float)
            - (rows["raw features"]["tuned"] == y)
            for rows, y in preds.values()
        ]
    )
    rng = np.random.RandomState(12345)
    r, n = diff.shape
    reps = np.empty(4000)
    for b in range(reps.size):
        seeds = rng.randint(0, r, r)
        images = rng.randint(0, n, n)
        reps[b] = 100 * diff[seeds][:, images].mean()
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert committed["ci95"] == pytest.approx([lo, hi], abs=0.2)
    ref = scipy_stats.ttest_1samp(100 * diff.mean(1), 0.0)
    assert committed["t_p"] == pytest.approx(ref.pvalue, rel=1e-9)
