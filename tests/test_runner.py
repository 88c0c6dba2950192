"""The one runner of both studies (poissonflow/experiments/runner.py): units of work run in
order, each stored when it finishes, results written partial after each and complete at the
end, a rerun reading the finished units back, --no-resume recomputing them; and both study
commands going through it with the same shared options."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

pytest.importorskip("sklearn")

from poissonflow.experiments import runner  # noqa: E402
from poissonflow.experiments.config import ConfigError, validate_common  # noqa: E402


@dataclasses.dataclass
class _Cfg:
    """The shared settings every study's configuration has."""

    out_dir: str
    dataset: str = "digits"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    cache_dir: str | None = None
    device: str = "cpu"
    threads: int | None = 1
    limit: int | None = 100
    progress: bool | None = False
    resume: bool = True


class _Stopped(Exception):
    pass


class _CountingStudy:
    """A unit per seed whose record is a function of the seed; `stop_at` raises there."""

    def __init__(self, stop_at=None):
        self.ran: list[int] = []
        self.writes: list[tuple[list[int], bool]] = []
        self.stop_at = stop_at

    def units(self, cfg, dataset, cache):
        return [
            runner.Unit(
                label=f"seed {s}",
                key=runner.unit_key(cfg, dataset, s, "test-unit", {"v": 1}),
                run=lambda s=s: self._run(s, dataset),
                meta={"what": "test-unit", "seed": s},
            )
            for s in cfg.seeds
        ]

    def _run(self, seed, dataset):
        self.ran.append(seed)
        if seed == self.stop_at:
            raise _Stopped
        y = np.asarray(dataset.y_test)
        return {"seed": seed, "score": seed / 10}, {"raw": {"tuned": (y + seed) % 10}}, y

    def write(self, cfg, dataset, done, t0, *, complete):
        self.writes.append(([d.record["seed"] for d in done], complete))
        return {"done": done, "complete": complete}


def test_units_run_in_order_partial_after_each_and_resume(tmp_path):
    cfg = _Cfg(out_dir=str(tmp_path / "out"))
    first = _CountingStudy(stop_at=2)
    with pytest.raises(_Stopped):
        runner.run_study(cfg, first)
    assert first.ran == [0, 1, 2]
    assert first.writes == [([0], False), ([0, 1], False)]  # partial after each, none complete

    again = _CountingStudy()
    out = runner.run_study(cfg, again)
    assert again.ran == [2]  # the finished units are read back, not recomputed
    assert out["complete"] and again.writes[-1] == ([0, 1, 2], True)
    done = out["done"]
    assert [d.record["resumed"] for d in done] == [True, True, False]
    assert [d.record["score"] for d in done] == [0.0, 0.1, 0.2]
    assert all(d.record["source_sha256"] == runner.source_sha256() for d in done)
    y = done[1].y_test
    np.testing.assert_array_equal(done[1].predictions["raw"]["tuned"], (y + 1) % 10)

    fresh = _CountingStudy()
    runner.run_study(dataclasses.replace(cfg, resume=False), fresh)
    assert fresh.ran == [0, 1, 2]  # --no-resume recomputes every unit
    # the key holds what changes a unit's results, not display settings or the seed list
    ds = runner.load_limited("digits", None, 100)
    key = runner.unit_key(cfg, ds, 0, "test-unit", {"v": 1})
    assert runner.unit_key(dataclasses.replace(cfg, threads=2), ds, 0, "test-unit", {"v": 1}) != key
    assert runner.unit_key(cfg, ds, 1, "test-unit", {"v": 1}) != key
    assert runner.unit_key(cfg, ds, 0, "test-unit", {"v": 2}) != key
    same = dataclasses.replace(cfg, progress=True, out_dir=str(tmp_path / "x"), seeds=(0,))
    assert runner.unit_key(same, ds, 0, "test-unit", {"v": 1}) == key


def test_shared_settings_are_validated_once_for_both_studies(tmp_path):
    from poissonflow.experiments.experiment import ExperimentConfig
    from poissonflow.experiments.ssl_experiment import SSLExperimentConfig

    out = str(tmp_path / "out")
    for change, option in [
        ({"seeds": (0, 0)}, "--seeds"),
        ({"threads": 0}, "--threads"),
        ({"limit": 5}, "--limit"),
        ({"device": "tpu"}, "--device"),
        ({"resume": "yes"}, "--no-resume"),
        ({"progress": "always"}, "--progress"),
    ]:
        for config in (ExperimentConfig, SSLExperimentConfig, _Cfg):
            with pytest.raises(ConfigError, match="^argument " + option):
                validate_common(config(out_dir=out, **change))


def test_both_commands_take_the_shared_options_and_run_through_the_runner(tmp_path, monkeypatch):
    from poissonflow.experiments import experiment, ssl_experiment

    seen = []

    def record(cfg, study):
        seen.append((type(study).__name__, cfg.seeds, cfg.threads, cfg.resume, cfg.progress))
        return {}

    monkeypatch.setattr(experiment, "run_study", record)
    monkeypatch.setattr(ssl_experiment, "run_study", record)
    shared = ["--seeds", "4", "7", "--threads", "2", "--no-resume", "--no-progress"]
    for module in (experiment, ssl_experiment):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        cfg = module.config_from_args(
            parser.parse_args([*shared, "--out", str(tmp_path / module.__name__)])
        )
        (experiment.run_experiment if module is experiment else ssl_experiment.run_ssl_experiment)(
            cfg
        )
    assert seen == [
        ("SupervisedStudy", (4, 7), 2, False, False),
        ("SelfSupervisedStudy", (4, 7), 2, False, False),
    ]
