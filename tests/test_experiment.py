"""The end-to-end experiment, reduced (few examples, one epoch): the outputs' structure and
that every number is finite and within its possible range. Loader and cache tests are in
tests/test_data.py and tests/test_cache.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import stat
import sys

import numpy as np
import pytest

from poissonflow import _io
from poissonflow.experiments import experiment, report
from poissonflow.experiments.experiment import ROWS, ExperimentConfig, run_experiment

# possible range of every reported number (features are L2-normalised for the metrics)
RANGES = {
    "train": (0, 1),
    "test": (0, 1),
    "val": (0, 1),
    "train_augmented": (0, 1),
    "train_last_epoch": (0, 1),
    "alignment": (0, 4),
    "uniform_loss": (-8, 0),
    "wasserstein_uniformity": (0, 2),
    "C": (1e-3, 1e3),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    cfg = ExperimentConfig(
        dataset="digits",
        seeds=(0, 1),
        out_dir=str(out),
        encoder_epochs=1,
        field_epochs=2,
        limit=240,
        progress=False,
    )
    return run_experiment(cfg), out


def _numbers(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_every_row_for_every_seed(results):
    res, _ = results
    assert [s["seed"] for s in res["per_seed"]] == [0, 1]
    for s in res["per_seed"]:
        assert list(s["rows"]) == ["encoder head"] + [name for name, _ in ROWS]
        for name, row in s["rows"].items():
            if name == "encoder head":
                assert set(row["head"]) == {"train", "train_augmented", "train_last_epoch", "test"}
            else:
                assert {"blog", "tuned", "metrics", "dim", "mean_norm"} <= set(row)
            keys = set(row["metrics"])
            assert {"uniform_loss", "wasserstein_uniformity", "effective_rank"} <= keys
            assert "alignment" in keys  # digits are augmented (crop): views exist


def test_every_number_is_finite_and_in_range(results):
    res, _ = results
    for s in res["per_seed"]:
        for name, row in s["rows"].items():
            for path, value in _numbers(row):
                assert math.isfinite(value), (name, path, value)
                lo, hi = RANGES.get(path[-1], (-math.inf, math.inf))
                assert lo - 1e-9 <= value <= hi + 1e-9, (name, path, value)
            rank = row["metrics"]["effective_rank"]
            assert 1 <= rank <= row["dim"] + 1e-9
        for p in s["sweep"]:
            assert 0 <= p["test_accuracy"] <= 1 and 0 <= p["fraction"] <= 1 + 1e-9
            assert math.isfinite(p["wasserstein_uniformity"])


def test_summary_json_table_and_plot(results):
    res, out = results
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["seeds"] == [0, 1] and on_disk["versions"]["poissonflow"]
    for entry in on_disk["summary"].values():
        for stats in entry.values():
            assert stats["n"] == 2 and stats["std"] >= 0
    table = (out / "results.md").read_text()
    for name, _ in ROWS:
        assert f"| {name} |" in table
    assert (out / "accuracy_vs_uniformity.png").stat().st_size > 10_000
    assert "Horizon sweep" in table and "| exact field | 1.00 |" in table
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_report_command_renders_again_from_the_json(results, tmp_path):
    from poissonflow.__main__ import main

    res, out = results
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    assert main(["report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()
    assert (tmp_path / "accuracy_vs_uniformity.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "missing.json")]) == 2  # one-line error, exit 2


def _point(curve, fraction, acc, w2):
    return {
        "curve": curve,
        "knob": "z_max",
        "value": fraction,
        "fraction": fraction,
        "test_accuracy": acc,
        "wasserstein_uniformity": w2,
        "uniform_loss": -1.0,
    }


def test_sweep_curves_average_by_position_across_seeds():
    # the exact field's horizon differs slightly per seed: points pair up by position
    seed0 = [_point("exact field", 0.061, 0.9, 1.2), _point("exact field", 1.0, 0.8, 1.0)]
    seed1 = [_point("exact field", 0.062, 0.7, 1.4), _point("exact field", 1.0, 0.6, 1.0)]
    c = report.sweep_curves([seed0, seed1])["exact field"]
    assert c["seeds"] == 2 and len(c["fraction"]) == 2
    assert c["accuracy"].tolist() == pytest.approx([0.8, 0.7])
    assert c["accuracy_std"].tolist() == pytest.approx([0.1, 0.1])
    assert c["w2"].tolist() == pytest.approx([1.3, 1.0])
    with pytest.raises(ValueError, match="different lengths"):
        report.sweep_curves([seed0, seed1[:1]])


def test_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("previous")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_results_files_have_normal_permissions(results):
    """Written like open() writes (0o666 less the umask), not 0600 as tempfile.mkstemp would:
    a results folder shared with others must be readable by them."""
    _, out = results
    expected = 0o666 & ~_umask()
    for name in ("results.json", "results.md", "accuracy_vs_uniformity.png"):
        assert _mode(out / name) == expected, name


def test_atomic_write_applies_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _io.atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        _io.atomic_write_text(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "b.txt") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_every_row_has_every_probe_and_the_learned_rows_their_guard_counts(results):
    """Per row k-NN (k = 20 and k chosen on validation, both at most the smallest class),
    1 / 10 labels a class, the converged blog classifier and a warning count; per learned
    row the share of guarded and on-plane points, the field's iterations and final loss (the
    untrained field: 0 iterations, no loss)."""
    res, _ = results
    for s in res["per_seed"]:
        n_fit = s["validation"]["n_fit"]
        for name, row in s["rows"].items():
            if name == "encoder head":
                continue
            for probe in ("blog_converged", "knn20", "knn", "labels1perclass", "labels10perclass"):
                assert 0 <= row[probe]["test"] <= 1, (name, probe)
            assert row["knn"]["k"] <= row["knn"]["k_cap"] and row["knn20"]["k"] <= 20
            assert row["knn"]["k_cap"] < n_fit / 10  # the smallest class, not the set
            assert row["labels1perclass"]["n_labels"] == 10  # one label of each class
            assert row["blog_converged"]["n_iter"] >= 1 and row["blog_converged"]["C"] == 1.0
            assert row["blog_converged"]["convergence_warnings"] == 0
            assert isinstance(row["convergence_warnings"], int)
        for name in (
            experiment.BLOG_ROW,
            experiment.UNTRAINED_ROW,
            experiment.PLATEAU_ROW,
            "flow: PFGM preset",
        ):
            info = s["rows"][name]["info"]
            assert 0 <= info["guarded_fraction"] <= 1 and 0 <= info["on_plane_fraction"] <= 1
            # flowed: the fit, validation and test features and the test set's two views
            assert info["points"] == res["dataset"]["n_train"] + 3 * res["dataset"]["n_test"]
            # the largest flowed norm (train and test) over their median
            assert info["norm_max_over_median"] >= 1.0
        blog = s["rows"][experiment.BLOG_ROW]["info"]
        assert blog["field_iterations"] == 2 and len(blog["field_loss_history"]) == 2
        assert blog["field_final_loss"] == blog["field_loss_history"][-1]
        plateau = s["rows"][experiment.PLATEAU_ROW]["info"]
        # --field-epochs 2 caps the plateau rule too: no evaluation (every 100 epochs) yet
        assert plateau["field_iterations"] == 2 and plateau["field_plateau_epoch"] is None
        assert plateau["field_val_loss_history"] == []
        untrained = s["rows"][experiment.UNTRAINED_ROW]["info"]
        assert untrained["field_iterations"] == 0 and untrained["field_final_loss"] is None


def test_predictions_are_saved_and_paired_against_raw(results):
    """predictions.npz holds every probe's per-image test predictions, and results.json the
    paired comparison of every row with the raw features (per seed and pooled), recomputed
    here from the saved predictions for one row."""
    from poissonflow.experiments.probes import paired_comparison

    res, out = results
    assert res["complete"] is True  # written after the last seed (earlier ones: False)
    assert res["torch_threads"] == 1  # the default --threads, restored after the run
    saved = np.load(out / "predictions.npz")
    y = saved["seed0/y_test"]
    assert len(y) == res["dataset"]["n_test"]
    raw, blog = saved["seed0/raw features/tuned"], saved[f"seed0/{experiment.BLOG_ROW}/tuned"]
    acc = res["per_seed"][0]["rows"][experiment.BLOG_ROW]["tuned"]["test"]
    assert float((blog == y).mean()) == pytest.approx(acc)
    got = res["paired"]["against_raw"]["tuned"][experiment.BLOG_ROW]["per_seed"]["0"]
    assert got == paired_comparison(raw == y, blog == y, n_boot=2000, seed=0)
    pooled = res["paired"]["against_raw"]["tuned"][experiment.BLOG_ROW]["pooled"]
    assert pooled["n"] == 2 * len(y)
    assert set(res["paired"]["against_raw"]["knn20"]) == {
        name for name, _ in ROWS if name != "raw features"
    }
    # the seed-aware statistics: every row x probe against raw, recomputed for one
    stats = res["seed_aware"]["against_raw"]["tuned"][experiment.BLOG_ROW]
    per_seed = [
        float(
            (saved[f"seed{k}/{experiment.BLOG_ROW}/tuned"] == y).mean()
            - (saved[f"seed{k}/raw features/tuned"] == y).mean()
        )
        for k in (0, 1)
    ]
    assert stats["per_seed_diff"] == pytest.approx([100 * v for v in per_seed])  # points
    assert stats["mean_diff"] == pytest.approx(100 * np.mean(per_seed))
    assert {
        "ci95",
        "t_p",
        "mcnemar_p_per_seed",
        "n_seeds",
        "n_images",
        "p_adjusted",
        "significant",
    } <= set(stats)
    assert set(res["seed_aware"]["against_raw"]) >= {"blog_converged", "knn", "labels1perclass"}
    head = saved["seed0/encoder head/head"]
    assert float((head == y).mean()) == pytest.approx(
        res["per_seed"][0]["rows"]["encoder head"]["head"]["test"]
    )
    comparison = res["paired"]["blog_comparison"]
    assert len(comparison) == 3 and all("pooled" in c for c in comparison.values())
    table = (out / "results.md").read_text()
    assert "The blog's comparison" in table and "blog LR on the raw features" in table
    assert (out / "field_loss_curves.png").stat().st_size > 10_000


def test_untrained_row_needs_only_the_initialised_field():
    features, labels = _toy_features()
    graph = experiment.row_graph(features, labels, experiment.RunSettings(seed=0))
    rows = experiment.evaluate_rows(graph, [experiment.UNTRAINED_ROW])
    assert graph.computed == ["field: blog, untrained", experiment.UNTRAINED_ROW]
    assert rows[experiment.UNTRAINED_ROW]["info"]["field_iterations"] == 0
    assert graph.get("field: blog, untrained").field.n_iterations_ == 0


def test_faithful_option_uses_the_faithful_blog_field():
    parser = _parser()
    cfg = experiment.config_from_args(parser.parse_args(["--faithful"]))
    assert cfg.faithful
    features, labels = _toy_features()
    run = experiment.RunSettings(seed=0, field_epochs=1, blog_preset="blog-faithful")
    graph = experiment.row_graph(features, labels, run)
    fitted = graph.get("field: blog")
    assert fitted.field.preset == "blog-faithful" and fitted.field.settings_["loss"] == "mean"


# --------------------------------------------------------------------------- the row graph


def _toy_features(n_train=200, n_test=80, d=16, seed=0):
    """Four well-separated clusters on the unit sphere (no encoder needed)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, d))

    def draw(n):
        y = np.arange(n) % 4
        x = centres[y] + 0.3 * rng.standard_normal((n, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    ftr, ytr = draw(n_train)
    fte, yte = draw(n_test)
    fva, yva = draw(n_test)
    views = tuple(
        (fte + 0.01 * rng.standard_normal(fte.shape)).astype(np.float32) for _ in range(2)
    )
    return experiment.Features(ftr, fte, views, fva), (ytr, yte, yva)


def test_a_row_runs_alone_and_computes_what_it_needs():
    features, labels = _toy_features()
    graph = experiment.row_graph(features, labels, experiment.RunSettings(seed=0, field_epochs=1))
    rows = experiment.evaluate_rows(graph, ["scale control"])
    assert list(rows) == ["scale control"]
    # the blog field and flow were computed for it, in dependency order, and nothing else
    assert graph.computed == ["field: blog", "flow: blog preset", "scale control"]
    blog = graph.get("flow: blog preset")
    expected = float(np.linalg.norm(blog.features.train, axis=1).mean())
    assert rows["scale control"]["info"]["scale"] == pytest.approx(expected, rel=1e-12)
    assert expected > 1.2  # the blog flow ends at radius >= sqrt(3) for unit features
    # a second row that needs the same flow reuses it
    experiment.evaluate_rows(graph, ["flow: blog, unit norm"])
    assert graph.computed[3:] == ["flow: blog, unit norm"]
    unit = graph.get("flow: blog, unit norm").features.test
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)  # float32
    with pytest.raises(ValueError, match="unknown row"):
        experiment.evaluate_rows(graph, ["no such row"])


def test_every_row_declares_needs_the_graph_provides():
    features, labels = _toy_features()
    graph = experiment.row_graph(features, labels, experiment.RunSettings(seed=0))
    inputs = {"features", "labels", "run"}
    for name, node in experiment.NODES.items():
        assert node.needs and set(node.needs) <= inputs | set(experiment.NODES), name
    assert graph.computed == []  # building the graph computes nothing


def test_graph_reports_cycles_and_missing_inputs():
    nodes = {"a": experiment.Node(("b",), lambda b: b), "b": experiment.Node(("a",), lambda a: a)}
    with pytest.raises(RuntimeError, match="cycle: a -> b -> a"):
        experiment.Graph({}, nodes).get("a")
    with pytest.raises(ValueError, match="nothing provides"):
        experiment.Graph({}, {"a": experiment.Node(("x",), lambda x: x)})
    with pytest.raises(ValueError, match="both given and computed"):
        experiment.Graph({"a": 1}, {"a": experiment.Node(("a",), lambda a: a)})


def test_learned_field_is_cached_and_not_retrained(tmp_path, monkeypatch):
    from poissonflow.learned import LearnedField

    features, labels = _toy_features()
    run = experiment.RunSettings(seed=0, field_epochs=1, cache_dir=tmp_path)
    first = experiment.row_graph(features, labels, run)
    cold = first.get("field: blog")
    assert not cold.from_cache and len(list(tmp_path.glob("*.npz"))) == 1

    def no_training(self, *a, **k):
        raise AssertionError("a cached learned field must not be retrained")

    monkeypatch.setattr(LearnedField, "fit", no_training)
    second = experiment.row_graph(features, labels, run)
    warm = second.get("field: blog")
    assert warm.from_cache and warm.train_seconds == pytest.approx(cold.train_seconds)
    # the loaded field flows bit for bit like the trained one
    a = first.get("flow: blog preset").features
    b = second.get("flow: blog preset").features
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert second.get("flow: blog preset").info["field_from_cache"] is True
    # other settings or other features: another key (so a new training run)
    key = experiment.learned_field_key(cold.field.get_params(), features.train)
    assert experiment.learned_field_key(cold.field.get_params(), features.test) != key
    other = dict(cold.field.get_params(), epochs=2)
    assert experiment.learned_field_key(other, features.train) != key
    shown = dict(cold.field.get_params(), progress=True)  # display only: same field
    assert experiment.learned_field_key(shown, features.train) == key
    with pytest.raises(AssertionError, match="must not be retrained"):
        experiment.row_graph(features, labels, dataclasses.replace(run, field_epochs=2)).get(
            "field: blog"
        )


# --------------------------------------------------------------------------- command line


def _parser():
    parser = argparse.ArgumentParser(prog="poissonflow experiment")
    experiment.add_arguments(parser)
    return parser


def test_every_option_has_help_text():
    for action in _parser()._actions:
        assert action.help and action.help.strip(), action.option_strings


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--limit", "-5"], "--limit"),
        (["--limit", "0"], "--limit"),
        (["--limit", "99"], "--limit"),
        (["--encoder-epochs", "0"], "--encoder-epochs"),
        (["--field-epochs", "0"], "--field-epochs"),
        (["--seeds", "0", "-1"], "--seeds"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--threads", "0"], "--threads"),
        (["--data-dir", "."], "--data-dir"),  # digits read no folder
        (["--dataset", "cifar10"], "--data-dir"),  # cifar10 needs one
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "--data-dir"),
        (["--dataset", "cifar10-subset", "--data-dir", "/nonexistent/subset.npz"], "--data-dir"),
        (["--device", "tpu"], "--device"),
        (["--out", __file__], "--out"),  # an existing file, not a folder
        (["--feature-dim", "1"], "--feature-dim"),  # S^0: two points
        (["--feature-dim", "0"], "--feature-dim"),
        (["--feature-dim", "-16"], "--feature-dim"),
        (["--feature-dim", "4097"], "--feature-dim"),
    ],
)
def test_bad_settings_are_rejected_before_any_work(argv, option, monkeypatch, tmp_path):
    def no_work(*a, **k):
        raise AssertionError("validation must come before any work")

    monkeypatch.setattr("poissonflow.experiments.data.load_dataset", no_work)
    monkeypatch.setattr(experiment, "run_seed", no_work)
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "out")]
    args = _parser().parse_args(argv)
    with pytest.raises(experiment.ConfigError) as err:
        experiment.main(args)
    assert isinstance(err.value, ValueError) and err.value.option == option
    assert str(err.value).startswith(f"argument {option}: ")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_data_folder(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK):
            pytest.skip("running as a user that can read any folder (root)")
        cfg = ExperimentConfig(dataset="cifar10", data_dir=str(folder), out_dir=str(tmp_path))
        with pytest.raises(experiment.ConfigError, match="--data-dir: .* is not readable"):
            experiment.validate_config(cfg)
    finally:
        folder.chmod(0o755)


def test_good_settings_pass_validation(tmp_path):
    cfg = experiment.config_from_args(
        _parser().parse_args(
            [
                "--limit",
                str(experiment.MIN_LIMIT),
                "--seeds",
                "0",
                "3",
                "--encoder-epochs",
                "1",
                "--out",
                str(tmp_path / "new" / "folder"),
            ]
        )
    )
    experiment.validate_config(cfg)
    assert cfg.seeds == (0, 3) and cfg.limit == experiment.MIN_LIMIT


# --------------------------------------------------------------------------- report input


@pytest.mark.parametrize(
    "content, words",
    [
        ("not json at all", "is not JSON"),
        ("[1, 2, 3]", "holds a list"),
        ('{"config": {}}', "lacks dataset, per_seed, summary"),
        (
            '{"config": {}, "dataset": {"name": "d", "n_train": 1, "n_test": 1}, "per_seed": [],'
            ' "summary": {}}',
            "per_seed",
        ),
    ],
)
def test_report_refuses_a_file_that_is_not_results(tmp_path, content, words):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="not an experiment results.json") as err:
        report.rerender(path)
    assert words in str(err.value)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8"):
        report.load_results(path)
    with pytest.raises(ValueError, match="is a folder"):
        report.load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        report.load_results(tmp_path / "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # nothing written


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="needs matplotlib.*pip install matplotlib"):
        report.plot_sweep([[_point("exact field", 1.0, 0.5, 1.0)]], "unused.png", "t")


_RUNTIME_ONLY = """
import sys

# the test, bench and triton extras: the main job must not need them (scipy, also a test
# extra, stays: scikit-learn depends on it). A None entry makes `import` fail and
# importlib.util.find_spec report the module absent, as if it were not installed.
for name in ("hypothesis", "pytest", "pytest_benchmark", "pykeops", "triton"):
    sys.modules[name] = None
import numpy as np
from poissonflow.experiments import experiment, report
rng = np.random.default_rng(0)
x = rng.standard_normal((120, 8)); x /= np.linalg.norm(x, axis=1, keepdims=True)
y = np.arange(120) % 3
feats = experiment.Features(x[:60].astype(np.float32), x[90:].astype(np.float32), (),
                            x[60:90].astype(np.float32))
run = experiment.RunSettings(seed=0, field_epochs=1)
graph = experiment.row_graph(feats, (y[:60], y[90:], y[60:90]), run)
experiment.evaluate_rows(graph, ["scale control", "flow: exact field"])
point = {"curve": "c", "knob": "k", "value": 1.0, "fraction": 1.0, "test_accuracy": 0.5,
         "wasserstein_uniformity": 1.0, "uniform_loss": -1.0}
report.plot_sweep([[point]], sys.argv[1], "t")
print("ok")
"""


def test_the_main_job_needs_only_runtime_dependencies(tmp_path):
    """Rows, learned field, flow, probes and the plot with the test extras made unimportable
    (run outside the source tree, which would shadow the install)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _RUNTIME_ONLY, str(tmp_path / "p.png")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
    assert (tmp_path / "p.png").stat().st_size > 1000


# --------------------------------------------------------------------------- probes and controls


def test_feature_dim_at_the_command_line_and_in_the_api(tmp_path, capsys, monkeypatch):
    """--feature-dim: a bad value is one line and exit status 2 before any work; in the API
    a ConfigError (a ValueError) naming the option; the default stays the blog's 128."""
    from poissonflow.__main__ import main

    def no_work(*a, **k):
        raise AssertionError("validation must come before any work")

    monkeypatch.setattr("poissonflow.experiments.data.load_dataset", no_work)
    for bad in ("1", "4097", "sixteen"):
        try:  # a ConfigError returns 2; argparse's own error (not an int) exits with 2
            code = main(["experiment", "--feature-dim", bad, "--out", str(tmp_path / "o")])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, bad
        assert len(err.strip().splitlines()) == 1 and "--feature-dim" in err, err
    assert not (tmp_path / "o").exists()
    for bad in (1, 0, 4097, 8.0, "8", True):
        cfg = ExperimentConfig(feature_dim=bad, out_dir=str(tmp_path / "o"))
        with pytest.raises(
            experiment.ConfigError,
            match="^argument --feature-dim: must be an integer from 2 to 4096, got ",
        ):
            run_experiment(cfg)
    assert experiment.config_from_args(_parser().parse_args([])).feature_dim is None
    assert (
        experiment.config_from_args(_parser().parse_args(["--feature-dim", "16"])).feature_dim == 16
    )
    assert experiment.encoder_settings(ExperimentConfig(), "digits", 0).arch.feat_dim == 128


class _Stopped(Exception):
    """Stands for the run being stopped (Ctrl-C, a kill) during a seed."""


_RUN_SEED = experiment.run_seed


def _counting_run_seed(monkeypatch, calls, fail_at=None):
    def run_seed(dataset, cfg, seed):
        calls.append(seed)
        if seed == fail_at:
            raise _Stopped
        return _RUN_SEED(dataset, cfg, seed)

    monkeypatch.setattr(experiment, "run_seed", run_seed)


def test_low_dimensional_run_is_partial_after_each_seed_and_resumes(tmp_path, monkeypatch):
    """A tiny --feature-dim 8 run stopped during its second seed keeps the first, marked
    partial in results.json and results.md; the same command then computes only the second
    seed and reads the first back unchanged; another feature dimension is another key."""
    from poissonflow.experiments.data import load_dataset

    cfg = ExperimentConfig(
        dataset="digits",
        seeds=(0, 1),
        out_dir=str(tmp_path / "out"),
        encoder_epochs=1,
        field_epochs=2,
        limit=experiment.MIN_LIMIT,
        sweep=False,
        progress=False,
        feature_dim=8,
        pfgm_plateau=True,
    )
    calls: list[int] = []
    _counting_run_seed(monkeypatch, calls, fail_at=1)
    with pytest.raises(_Stopped):
        run_experiment(cfg)
    assert calls == [0, 1]
    partial = json.loads((tmp_path / "out" / "results.json").read_text())
    assert partial["complete"] is False
    assert partial["seeds_done"] == [0] and partial["seeds_planned"] == [0, 1]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "**Partial results: 1 of 2 planned seeds done (seeds 0).**" in md
    assert "8-d features" in md.splitlines()[0]
    rows = partial["per_seed"][0]["rows"]
    assert rows["encoder head"]["dim"] == 8 and rows["raw features"]["dim"] == 8
    assert rows[experiment.BLOG_ROW]["dim"] == 9  # the blog's raw (d + 1)-d end points
    # --pfgm-plateau adds its row after the PFGM preset's (capped here by --field-epochs)
    names = list(rows)[1:]
    assert names == experiment.row_names(pfgm_plateau=True)
    assert names.index(experiment.PFGM_PLATEAU_ROW) == names.index("flow: PFGM preset") + 1
    assert rows[experiment.PFGM_PLATEAU_ROW]["info"]["field_iterations"] == 2
    seconds = partial["per_seed"][0]["seconds"]
    assert 0 < seconds["cpu_total"] and 0 < seconds["encoder"] <= seconds["total"]

    calls.clear()
    _counting_run_seed(monkeypatch, calls)
    done = run_experiment(cfg)
    assert calls == [1]  # seed 0 is read back, not recomputed
    assert done["complete"] is True and done["seeds_done"] == [0, 1]
    assert [s["resumed"] for s in done["per_seed"]] == [True, False]
    final = json.loads((tmp_path / "out" / "results.json").read_text())
    assert final["per_seed"][0]["rows"] == partial["per_seed"][0]["rows"]
    assert "Partial results" not in (tmp_path / "out" / "results.md").read_text()
    saved = np.load(tmp_path / "out" / "predictions.npz")
    assert {"seed0/y_test", "seed1/y_test", f"seed0/{experiment.BLOG_ROW}/tuned"} <= set(
        saved.files
    )
    assert (
        final["paired"]["against_raw"]["tuned"][experiment.BLOG_ROW]["pooled"]["n"]
        == 2 * final["dataset"]["n_test"]
    )

    # what changes a seed's results changes its key; display settings do not
    ds = load_dataset("digits", None)
    key = experiment.seed_result_key(cfg, ds, 0)
    assert experiment.seed_result_key(cfg, ds, 1) != key
    for change in (
        {"feature_dim": 16},
        {"feature_dim": None},
        {"field_epochs": 3},
        {"faithful": True},
        {"threads": 2},
        {"sweep": True},
        {"pfgm_plateau": False},
    ):
        assert experiment.seed_result_key(dataclasses.replace(cfg, **change), ds, 0) != key
    for change in ({"progress": True}, {"out_dir": str(tmp_path / "elsewhere")}, {"seeds": (0,)}):
        assert experiment.seed_result_key(dataclasses.replace(cfg, **change), ds, 0) == key

    # --no-resume recomputes a finished seed
    calls.clear()
    run_experiment(dataclasses.replace(cfg, seeds=(0,), resume=False))
    assert calls == [0]


def test_the_pfgm_plateau_row_is_only_computed_when_asked_for():
    """The default rows are ROWS (the PFGM field to its plateau costs about 100 s of CPU a
    seed on digits); --pfgm-plateau adds it; a bad value is refused naming the option."""
    assert experiment.row_names() == [name for name, _ in ROWS]
    assert experiment.PFGM_PLATEAU_ROW not in dict(ROWS)
    assert experiment.config_from_args(_parser().parse_args([])).pfgm_plateau is False
    assert experiment.config_from_args(_parser().parse_args(["--pfgm-plateau"])).pfgm_plateau
    with pytest.raises(experiment.ConfigError, match="^argument --pfgm-plateau: "):
        experiment.validate_config(ExperimentConfig(pfgm_plateau="yes"))
    features, labels = _toy_features()
    graph = experiment.row_graph(features, labels, experiment.RunSettings(seed=0, field_epochs=1))
    rows = experiment.evaluate_rows(graph, [experiment.PFGM_PLATEAU_ROW])
    assert graph.computed == ["field: pfgm, plateau", experiment.PFGM_PLATEAU_ROW]
    field = graph.get("field: pfgm, plateau").field
    assert (field.preset, field.patience, field.eval_every) == ("pfgm", 5, 100)
    assert rows[experiment.PFGM_PLATEAU_ROW]["dim"] == features.train.shape[1] + 1  # sphere


# --------------------------------------------------------------------------- the protocol


def test_validation_split_is_disjoint_from_what_the_encoder_and_fields_trained_on(results):
    """Per seed: the recorded validation images are a stratified fifth of the training set,
    fixed by the seed; the encoder and the learned fields were fit on the other images only
    (their cache keys fingerprint exactly those), and results.json records the split."""
    from poissonflow.experiments import encoder as enc_mod
    from poissonflow.experiments.protocol import VAL_FRACTION, validation_split
    from poissonflow.experiments.runner import load_limited

    res, out = results
    dataset = load_limited("digits", None, 240)
    assert res["protocol"]["val_fraction"] == VAL_FRACTION
    for s in res["per_seed"]:
        v = s["validation"]
        fit_idx, val_idx = validation_split(dataset.y_train, s["seed"])
        assert v["indices"] == val_idx.tolist() and v["n_val"] == len(val_idx)
        assert v["n_fit"] + v["n_val"] == res["dataset"]["n_train"]
        assert not set(fit_idx.tolist()) & set(val_idx.tolist())
        assert v["n_val"] == math.ceil(VAL_FRACTION * len(dataset.y_train))
        # stratified: every class in both parts
        assert set(dataset.y_train[val_idx]) == set(dataset.y_train)
        # the encoder's cached features are those of a model trained on the fit images only:
        # encoding the fit images (and the validation images held out) hits that entry
        fit = dataclasses.replace(
            dataset, x_train=dataset.x_train[fit_idx], y_train=dataset.y_train[fit_idx]
        )
        settings = experiment.encoder_settings(
            ExperimentConfig(encoder_epochs=1), "digits", s["seed"]
        )
        enc = enc_mod.encode_dataset(
            fit, settings, cache_dir=out / "cache", progress=False, x_val=dataset.x_train[val_idx]
        )
        assert enc.from_cache and len(enc.features_train) == len(fit_idx)
        assert len(enc.features_val) == len(val_idx)
        # the fields trained on those features: their cached entry is keyed by them
        from poissonflow.experiments.cache import ArrayCache
        from poissonflow.learned import LearnedField

        params = LearnedField(preset="blog", seed=s["seed"], device="cpu", epochs=2).get_params()
        key = experiment.learned_field_key(params, enc.features_train)
        assert ArrayCache(out / "cache").path(key).exists()
    a = validation_split(dataset.y_train, 0)[1]
    b = validation_split(dataset.y_train, 1)[1]
    assert a.tolist() != b.tolist()
    np.testing.assert_array_equal(a, validation_split(dataset.y_train, 0)[1])


def test_results_schema_carries_the_protocol_fields(results):
    res, out = results
    assert {"seed_aware", "protocol", "cpu_seconds", "seeds_done", "seeds_planned"} <= set(res)
    for key in (
        "tuned_Cs",
        "knn_grid",
        "labels_per_class",
        "blog_converged_max_iter",
        "clip_factor",
    ):
        assert key in res["protocol"]
    for s in res["per_seed"]:
        assert {"fraction", "n_val", "n_fit", "indices", "held_out_from"} <= set(s["validation"])
        for name in ROWS:
            row = s["rows"][name[0]]
            assert set(row["tuned"]["val_accuracies"]) and 0 <= row["tuned"]["val"] <= 1
        for name in (
            "flow: blog, far points clipped",
            "flow: blog preset, to plateau, far points clipped",
        ):
            info = s["rows"][name]["info"]
            assert info["clip_radius"] > 0 and 0 <= info["clipped_fraction"] <= 1
        for name in (
            "flow: untrained blog field, unit norm",
            "flow: blog preset, to plateau, unit norm",
        ):
            assert s["rows"][name]["mean_norm"] == pytest.approx(1.0, rel=1e-5)
    on_disk = json.loads((out / "results.json").read_text())
    assert (
        on_disk["per_seed"][0]["validation"]["indices"]
        == res["per_seed"][0]["validation"]["indices"]
    )
