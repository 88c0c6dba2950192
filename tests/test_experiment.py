"""The end-to-end experiment, reduced (few examples, one epoch): the outputs' structure and
that every number is finite and within its possible range. Loader and cache tests are in
tests/test_data.py and tests/test_cache.py."""

from __future__ import annotations

import json
import math
import os

import pytest

from poissonflow import report
from poissonflow.experiment import ROWS, ExperimentConfig, run_experiment

# possible range of every reported number (features are L2-normalised for the metrics)
RANGES = {
    "train": (0, 1), "test": (0, 1), "val": (0, 1), "train_augmented": (0, 1),
    "train_last_epoch": (0, 1), "alignment": (0, 4), "uniform_loss": (-8, 0),
    "wasserstein_uniformity": (0, 2), "C": (1e-3, 1e3),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    cfg = ExperimentConfig(
        dataset="digits", seeds=(0, 1), out_dir=str(out), encoder_epochs=1, field_epochs=2,
        limit=240, progress=False,
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
    for name, entry in on_disk["summary"].items():
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
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "missing.json")])


def _point(curve, fraction, acc, w2):
    return {"curve": curve, "knob": "z_max", "value": fraction, "fraction": fraction,
            "test_accuracy": acc, "wasserstein_uniformity": w2, "uniform_loss": -1.0}


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

    monkeypatch.setattr(report.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report._atomic_write(target, b"new contents")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
