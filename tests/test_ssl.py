"""Self-supervised objectives, their training loop and feature cache
(poissonflow/experiments/ssl.py), and
the driver's validation and outputs (poissonflow/experiments/ssl_experiment.py). No test reads
/work/shared:
the end-to-end case runs on a few digits."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from poissonflow import losses as L
from poissonflow import metrics as M
from poissonflow.experiments import ssl
from poissonflow.experiments.augment import DigitsAugment


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- NT-Xent


def test_nt_xent_matches_the_definition():
    g = seeded(0)
    z1, z2 = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    tau = 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = 5
    total = 0.0
    for k in range(2 * n):
        pos = (k + n) % (2 * n)
        sims = [float(z[k] @ z[j]) / tau for j in range(2 * n) if j != k]
        total += -(float(z[k] @ z[pos]) / tau - math.log(sum(math.exp(s) for s in sims)))
    assert float(ssl.nt_xent_loss(z1, z2, tau)) == pytest.approx(total / (2 * n), rel=1e-12)
    # identical views score lower than unrelated ones
    assert float(ssl.nt_xent_loss(z1, z1, tau)) < float(ssl.nt_xent_loss(z1, z2, tau))


# ----------------------------------------------------------------------------- each objective
# A tiny encoder (MLP 16 -> 64 -> 8, L2-normalised output, started nearly collapsed by a large
# output bias) trained for a few Adam steps on two jittered views of 128 points of 8 clusters.
# Each objective must move its own metric the right way, measured on fixed evaluation views.


def clusters(n=128, d=16, k=8, seed=0):
    g = seeded(seed)
    centres = 3.0 * torch.randn(k, d, generator=g)
    return centres[torch.arange(n) % k] + 0.5 * torch.randn(n, d, generator=g)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
        )
        with torch.no_grad():
            self.net[2].bias.copy_(torch.full((8,), 3.0))  # every output near one direction

    def forward(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=1)


def views(x, g, scale=0.1):
    return x + scale * torch.randn(x.shape, generator=g), x + scale * torch.randn(
        x.shape, generator=g
    )


GAUSS_REF = torch.randn(2000, 8, generator=torch.Generator().manual_seed(9))


def gaussian_gap(z):
    return M.energy_distance((z - z.mean(0)) / z.std(0, unbiased=False), GAUSS_REF)


def separation(z1, z2):
    n = len(z1)
    return float(torch.cdist(z1, z2).sum() / (n * (n - 1)) / (z1 - z2).norm(dim=1).mean())


# (objective, metric(z1, z2) on fixed evaluation views, check(before, after)). Measured with
# these seeds: NT-Xent 5.48 -> 4.00; uniform_loss -0.13 -> -2.18; W2 1.31 -> 0.23; energy
# distance to the sphere 1.15 -> 0.10; standardised features' energy distance to N(0, I)
# 0.156 -> 0.034; separation ratio 24 -> 55; Riesz (s = 2) energy
# 4.22 -> 2.10. The checks leave about 2x margin on the change.
OBJ_CASES = [
    (
        ssl.InfoNCE(),
        lambda a, b: float(ssl.nt_xent_loss(a, b, 0.5)),
        lambda before, after: after < before - 0.7,
    ),
    (
        ssl.AlignUniform(),
        lambda a, b: float(M.uniform_loss(torch.cat([a, b]))),
        lambda before, after: after < before - 1.0,
    ),
    (
        ssl.AlignUniformW2(),
        lambda a, b: float(M.wasserstein_uniformity(torch.cat([a, b]))),
        lambda before, after: after < 0.5 * before,
    ),
    (
        ssl.NoiseInfoNCE(),
        lambda a, b: M.energy_distance_to_sphere(torch.cat([a, b])),
        lambda before, after: after < 0.3 * before,
    ),
    (
        ssl.NoiseInfoNCEGaussian(),
        lambda a, b: gaussian_gap(torch.cat([a, b])),
        lambda before, after: after < 0.5 * before,
    ),
    (ssl.ContrastiveL2(), separation, lambda before, after: after > 1.5 * before),
    (
        ssl.AlignRiesz(s=2.0, bank_size=256),
        lambda a, b: float(L.riesz_uniformity_loss(torch.cat([a, b]), 2.0)),
        lambda before, after: after < before - 1.0,
    ),
]


@pytest.mark.parametrize("case", OBJ_CASES, ids=[c[0].name for c in OBJ_CASES])
def test_each_objective_moves_its_metric(case, one_thread):
    objective, metric, check = case
    x = clusters()
    net = Tiny()
    g = seeded(1)
    ev1, ev2 = views(x, seeded(99))
    with torch.no_grad():
        before = metric(net(ev1), net(ev2))
    objective.start(8, torch.float32, "cpu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        v1, v2 = views(x, g)
        z1, z2 = net(v1), net(v2)
        loss = objective.loss(z1, z2, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step(z1.detach(), z2.detach())
    with torch.no_grad():
        after = metric(net(ev1), net(ev2))
    assert check(before, after), (objective.name, before, after)


def test_align_riesz_bank_fills_after_steps():
    obj = ssl.AlignRiesz(s=1.0, bank_size=10)
    obj.start(4, torch.float32, "cpu")
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=seeded(0)), dim=1)
    no_bank = float(obj.loss(z, z.flip(0)))
    # other rows than the batch's: bank rows equal to batch rows are the same points (the Riesz
    # loss's coincident rows) and would add no pair
    w = torch.nn.functional.normalize(torch.randn(6, 4, generator=seeded(1)), dim=1)
    obj.after_step(w, w)
    assert len(obj._bank) == 6
    with_bank = float(obj.loss(z.flip(0), z))
    assert with_bank != no_bank  # the bank's pairs count
    obj.after_step(z, z)
    assert len(obj._bank) == 10


def test_align_riesz_leaves_out_the_batch_own_images():
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=seeded(1)), dim=1)
    obj = ssl.AlignRiesz(s=2.0, bank_size=8)
    obj.start(4, torch.float32, "cpu")
    obj.after_step(z, z, index=torch.arange(6))
    seen = obj.bank_rows(torch.tensor([0, 1, 7]))
    assert torch.equal(seen, z[2:])  # images 0 and 1 are in the batch: their rows are left out
    assert torch.equal(obj.bank_rows(None), z)
    # a batch of images 0..5 again: every bank row is its own image's, so no bank pairs at all
    assert obj.bank_rows(torch.arange(6)).shape == (0, 4)
    exact = float(L.riesz_uniformity_loss(z, 2.0))
    assert float(obj.loss(z, z, index=torch.arange(6))) == pytest.approx(exact, rel=1e-6)
    keep = ssl.AlignRiesz(s=2.0, bank_size=8, exclude_own=False)
    keep.start(4, torch.float32, "cpu")
    keep.after_step(z, z, index=torch.arange(6))
    assert keep.bank_rows(torch.arange(6)).shape == (6, 4)
    # the bank of the same images holds every row's exact duplicate: the Riesz loss counts
    # each as the same point (coincident rows), so the loss is that without the bank
    assert float(keep.loss(z, z, index=torch.arange(6))) == pytest.approx(exact, rel=1e-6)


# ----------------------------------------------------------------------------- training loop


def tiny_images(n=40, seed=0):
    g = seeded(seed)
    protos = torch.rand(4, 1, 8, 8, generator=g)
    return (protos[torch.arange(n) % 4] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)


def test_train_ssl_deterministic_and_cached(tmp_path, one_thread):
    x = tiny_images()
    settings = ssl.SSLSettings(epochs=2, batch_size=16, seed=3)
    obj = ssl.AlignUniform()
    a = ssl.encode_ssl(x, x[:10], "fp", obj, DigitsAugment(), settings, cache_dir=tmp_path)
    b = ssl.encode_ssl(x, x[:10], "fp", obj, DigitsAugment(), settings)  # no cache: retrains
    assert not a.from_cache and not b.from_cache
    assert np.array_equal(a.features_train, b.features_train)
    assert np.array_equal(a.views_test[0], b.views_test[0])
    assert not np.array_equal(a.views_test[0], a.views_test[1])
    assert np.allclose(np.linalg.norm(a.features_train, axis=1), 1.0, atol=1e-5)
    c = ssl.encode_ssl(x, x[:10], "fp", obj, DigitsAugment(), settings, cache_dir=tmp_path)
    assert c.from_cache and c.key == a.key
    assert np.array_equal(c.features_train, a.features_train)
    assert c.history.epoch_loss == a.history.epoch_loss
    other = ssl.encode_ssl(
        x, x[:10], "fp", ssl.AlignUniform(t=1.0), DigitsAugment(), settings, cache_dir=tmp_path
    )
    assert other.key != a.key and not other.from_cache
    seed4 = ssl.encode_ssl(
        x, x[:10], "fp", obj, DigitsAugment(), ssl.SSLSettings(epochs=2, batch_size=16, seed=4)
    )
    assert not np.array_equal(seed4.features_train, a.features_train)


def test_train_ssl_lowers_its_loss(one_thread):
    x = tiny_images(64)
    _, hist = ssl.train_ssl(
        x,
        ssl.AlignRiesz(s=2.0, bank_size=64),
        DigitsAugment(),
        ssl.SSLSettings(epochs=6, batch_size=32, seed=0),
    )
    assert len(hist.epoch_loss) == 6 and all(math.isfinite(v) for v in hist.epoch_loss)
    assert hist.epoch_loss[-1] < hist.epoch_loss[0]


def test_bad_input():
    with pytest.raises(ValueError, match="objective must be one of"):
        ssl.make_objective("simsiam")
    with pytest.raises(ValueError, match="s must be"):
        ssl.AlignRiesz(s=0.0)
    with pytest.raises(ValueError, match="bank_size"):
        ssl.AlignRiesz(bank_size=-1)
    with pytest.raises(ValueError, match="temperature"):
        ssl.InfoNCE(temperature=-1.0)
    with pytest.raises(ValueError, match="target"):
        ssl.NoiseInfoNCE(target="cube")
    with pytest.raises(ValueError, match="batch_size"):
        ssl.SSLSettings(batch_size=1)
    with pytest.raises(ValueError, match="arch"):
        ssl.SSLSettings(arch="resnet")
    with pytest.raises(ValueError, match="x_train must be 4-D"):
        ssl.train_ssl(torch.rand(10, 64), ssl.InfoNCE(), DigitsAugment(), ssl.SSLSettings())
    with pytest.raises(TypeError, match="augmentation"):
        ssl.train_ssl(tiny_images(), ssl.InfoNCE(), None, ssl.SSLSettings())
    with pytest.raises(TypeError, match="objective"):
        ssl.train_ssl(tiny_images(), "infonce", DigitsAugment(), ssl.SSLSettings())
    with pytest.raises(ValueError, match="fingerprint"):
        ssl.encode_ssl(
            tiny_images(), tiny_images(), "", ssl.InfoNCE(), DigitsAugment(), ssl.SSLSettings()
        )


# ----------------------------------------------------------------------------- the driver


def test_config_errors_name_the_option(tmp_path):
    from poissonflow.experiments.experiment import ConfigError
    from poissonflow.experiments.ssl_experiment import SSLExperimentConfig, validate_config

    ok = dict(out_dir=str(tmp_path / "out"))
    for change, option in [
        ({"objectives": ("simsiam",)}, "--objectives"),
        ({"objectives": ("infonce", "infonce")}, "--objectives"),
        ({"seeds": (-1,)}, "--seeds"),
        ({"epochs": 0}, "--epochs"),
        ({"riesz_s": -2.0}, "--riesz-s"),
        ({"s_grid": ()}, "--s-grid"),
        ({"rows": ("L2 (centred)",)}, "--rows"),
        ({"rows": ("raw features", "no such row")}, "--rows"),
        ({"data_dir": str(tmp_path)}, "--data-dir"),
        ({"dataset": "mnist"}, "--dataset"),
        ({"limit": 5}, "--limit"),
        ({"riesz_weight": 0.0}, "--riesz-weight"),
        ({"weight_grid": (1.0, -4.0)}, "--weight-grid"),
        ({"validate_only": True, "objectives": ("infonce",)}, "--validate-only"),
        ({"validate_only": True, "riesz_s": 1.0}, "--validate-only"),
    ]:
        with pytest.raises(ConfigError, match=option.replace("-", "\\-")):
            validate_config(SSLExperimentConfig(**ok, **change))
    validate_config(SSLExperimentConfig(**ok))


def test_cli_bad_argument_exits_2(capsys):
    from poissonflow.__main__ import main

    assert main(["ssl-experiment", "--objectives", "simsiam", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--objectives" in err[0]


def test_end_to_end_tiny_and_resumes(tmp_path, one_thread):
    from poissonflow.experiments.ssl_experiment import SSLExperimentConfig, run_ssl_experiment

    cfg = SSLExperimentConfig(
        objectives=("align_uniform", "align_riesz"),
        seeds=(0,),
        epochs=1,
        batch_size=32,
        s_grid=(1.0, 2.0),
        bank_size=64,
        rows=("raw features", "L2 (centred)"),
        limit=100,
        weight_grid=(1.0, 4.0),
        out_dir=str(tmp_path / "out"),
    )
    first = run_ssl_experiment(cfg)
    out = tmp_path / "out"
    for name in ("results.json", "results.md", "alignment_uniformity.png", "s_validation.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["s_validation"]["chosen_s"] in (1.0, 2.0)
    assert [p["s"] for p in data["s_validation"]["points"]] == [1.0, 2.0]
    recs = data["per_encoder"]
    assert [r["objective"] for r in recs] == ["align_uniform", "align_riesz"]
    assert all(r["epochs"] == 1 and r["train_seconds"] > 0 for r in recs)
    assert recs[1]["objective_settings"]["s"] == data["s_validation"]["chosen_s"]
    # the uniformity weights chosen on the validation split, and used
    wv = data["weight_validation"]
    assert set(wv) == {"align_uniform", "align_riesz"}
    for r in recs:
        assert [p["weight"] for p in wv[r["objective"]]["points"]] == [1.0, 4.0]
        assert r["objective_settings"]["uniform_weight"] == wv[r["objective"]]["chosen"]
        # trained on the fit images only; the validation split recorded
        v = r["validation"]
        assert v["n_fit"] + v["n_val"] == data["dataset"]["n_train"] and v["n_val"] >= 10
    assert set(data["seed_aware"]) == {"align_uniform", "align_riesz"}
    for r in recs:
        assert set(r["rows"]) == {"raw features", "L2 (centred)"}
        assert 0 <= r["rows"]["raw features"]["tuned"]["test"] <= 1
    assert "align_riesz" in data["summary"] and data["riesz_vs_uniform"]["seeds"] == [0]
    assert "chosen s" in (out / "results.md").read_text()
    assert data["units_done"] == [["align_uniform", 0], ["align_riesz", 0]]
    # the per-image predictions are saved, and the committed statistics recompute from them
    from poissonflow.experiments.reanalyse import check_run, load_predictions

    assert check_run(out) == []
    saved = load_predictions(out, ["raw features", "L2 (centred)"], group="align_riesz")
    assert list(saved) == [0] and set(saved[0][0]) == {"raw features", "L2 (centred)"}
    assert data["cpu_seconds"] > 0 and all(r["cpu_seconds"] > 0 for r in recs)
    assert [r["resumed"] for r in first["per_encoder"]] == [False, False]
    second = run_ssl_experiment(cfg)  # the finished units read back: the same numbers
    assert [r["resumed"] for r in second["per_encoder"]] == [True, True]
    assert second["summary"] == first["summary"]
    assert second["per_encoder"][1]["rows"] == first["per_encoder"][1]["rows"]
    # --no-resume recomputes the units, from the encoders and rows cached on their own
    third = run_ssl_experiment(dataclasses.replace(cfg, resume=False))
    assert all(r["encoder_from_cache"] and r["rows_from_cache"] for r in third["per_encoder"])
    assert [r["resumed"] for r in third["per_encoder"]] == [False, False]
    assert third["summary"] == first["summary"]


def test_the_shared_training_loop_is_the_loop_written_out(one_thread):
    """ssl.train_ssl runs through training.train_loop: the permutation and both views' draws in
    the same order as the loop written out by hand (as it stood before the loop was shared), so
    the trained weights agree bit for bit."""
    from poissonflow.experiments.data import load_digits
    from poissonflow.experiments.encoder import SmallAlexNet

    x = torch.as_tensor(load_digits().x_train[:200])
    aug = DigitsAugment()
    settings = ssl.SSLSettings(epochs=2, batch_size=64, seed=5, arch="digits")
    model, history = ssl.train_ssl(x, ssl.make_objective("infonce"), aug, settings)

    objective = ssl.make_objective("infonce")
    n, c, h, w = x.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        ref = SmallAlexNet(c, (h, w), settings.alexnet())
    count = n * h * w
    mean = x.sum(dim=(0, 2, 3), dtype=torch.float64) / count
    var = (x * x).sum(dim=(0, 2, 3), dtype=torch.float64) / count - mean * mean
    ref.set_input_stats(mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-6).float())
    gen = torch.Generator().manual_seed(settings.seed)
    loss_gen = torch.Generator().manual_seed(settings.seed + 7919)
    opt = torch.optim.Adam(ref.parameters(), lr=settings.lr)
    objective.start(ref.feat_dim, torch.float32, "cpu")
    losses = []
    for _ in range(settings.epochs):
        ref.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if idx.numel() < 2:
                continue
            v1, v2 = aug(x[idx], gen), aug(x[idx], gen)
            z = ref(torch.cat([v1, v2]))
            z1, z2 = z[: idx.numel()], z[idx.numel() :]
            loss = objective.loss(z1, z2, loss_gen, index=idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.after_step(z1.detach(), z2.detach(), index=idx)
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        losses.append(total / seen)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert history.epoch_loss == losses
