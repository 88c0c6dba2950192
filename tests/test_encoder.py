"""poissonflow.experiments.encoder: architecture, augmentation, seeded training, features and their
cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from poissonflow.experiments import data
from poissonflow.experiments import encoder as E

# A tiny network so that a training epoch on a few hundred digits takes well under a second.
TINY = E.AlexNetConfig(conv_widths=(8, 16, 16, 16, 8), pool_after=(1,), fc_width=32, feat_dim=16)
TINY_SETTINGS = E.EncoderSettings(
    arch=TINY, augmentation=E.Augmentation(pad=1, flip=False), epochs=1, batch_size=32, seed=0
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks run fastest on one thread, and on a loaded 2-core machine two OpenMP
    threads were measured 10x slower (0.11 s against 1.1 s an epoch here). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.fixture(scope="module")
def small_digits(digits):
    """300 train / 100 test digits as a Dataset."""
    return dataclasses.replace(
        digits,
        name="digits-small",
        x_train=digits.x_train[:300],
        y_train=digits.y_train[:300],
        x_test=digits.x_test[:100],
        y_test=digits.y_test[:100],
    )


# ---------------------------------------------------------------------------------------------
# architecture


def test_blog_layout_on_32x32():
    torch.manual_seed(0)
    net = E.SmallAlexNet(3, (32, 32), E.BLOG_ALEXNET)
    convs = [m for m in net.conv.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 192, 384, 384, 192]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    pools = [i for i, block in enumerate(net.conv) if isinstance(block[-1], torch.nn.MaxPool2d)]
    assert pools == [0, 1, 4]
    linears = [m for m in net.fc.modules() if isinstance(m, torch.nn.Linear)]
    # 32 -> 15 -> 7 -> 3 through the three MaxPool2d(3, 2).
    assert [(m.in_features, m.out_features) for m in linears] == [
        (192 * 3 * 3, 4096),
        (4096, 4096),
        (4096, 128),
    ]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.fc) == 2
    net.eval()
    with torch.no_grad():
        f = net(torch.rand(3, 3, 32, 32))
    assert f.shape == (3, 128)
    # Tolerance: float32 normalisation, a few ulps.
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)


def test_digits_layout_and_size_checks():
    net = E.SmallAlexNet(1, (8, 8), E.DIGITS_ALEXNET)
    assert net.fc[1].in_features == 64 * 3 * 3  # one pool: 8 -> 3
    assert net.conv[0][0].in_channels == 1
    with pytest.raises(ValueError, match="too small for pools"):
        E.SmallAlexNet(1, (8, 8), E.BLOG_ALEXNET)  # 8 -> 3 -> 1, then no room for a 3x3 pool
    with pytest.raises(ValueError, match="conv_widths"):
        E.AlexNetConfig(conv_widths=(8, 8))
    with pytest.raises(ValueError, match="pool_after"):
        E.AlexNetConfig(pool_after=(5,))


def test_default_settings():
    blog = E.default_settings("cifar10-subset")
    assert (blog.epochs, blog.batch_size, blog.lr) == (20, 256, 1e-3)
    assert blog.augmentation == E.Augmentation(pad=4, flip=True) and blog.arch == E.BLOG_ALEXNET
    dig = E.default_settings("digits")
    assert dig.augmentation.flip is False  # a mirrored digit is another shape
    with pytest.raises(ValueError, match="dataset_name"):
        E.default_settings("mnist")


@pytest.mark.parametrize(
    "change, err, match",
    [
        ({"epochs": -1}, ValueError, "epochs"),
        ({"batch_size": 1}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"arch": "big"}, TypeError, "arch"),
    ],
)
def test_settings_validation(change, err, match):
    with pytest.raises(err, match=match):
        TINY_SETTINGS.replace(**change)


# ---------------------------------------------------------------------------------------------
# augmentation


def test_augment_off_is_identity():
    x = torch.rand(4, 3, 6, 6)
    out = E.augment(x, E.Augmentation(pad=0, flip=False), torch.Generator().manual_seed(0))
    assert out is x


def test_augment_crop_and_flip_are_windows_of_the_padded_image():
    x = torch.rand(64, 2, 5, 7)
    aug = E.Augmentation(pad=2, flip=True)
    out = E.augment(x, aug, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(x.shape[0]):
        matches = [
            (oy, ox, fl)
            for oy in range(5)
            for ox in range(5)
            for fl in (False, True)
            if torch.equal(
                out[i],
                (lambda win: win.flip(-1) if fl else win)(padded[i, :, oy : oy + 5, ox : ox + 7]),
            )
        ]
        assert matches, f"image {i} is not a (flipped) window of its padded input"
        seen.update(matches)
    # 64 draws over 5 * 5 offsets x 2 flips: both flips and several offsets occur.
    assert {fl for _, _, fl in seen} == {False, True}
    assert len({(oy, ox) for oy, ox, _ in seen}) >= 10


def test_augment_without_flip_never_mirrors():
    # Asymmetric images: a mirrored window would not equal any unflipped window.
    x = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(40, 1, 1, 1)
    out = E.augment(x, E.Augmentation(pad=1, flip=False), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(40):
        assert any(
            torch.equal(out[i], padded[i, :, oy : oy + 8, ox : ox + 8])
            for oy in range(3)
            for ox in range(3)
        )


def test_augment_is_seeded():
    x = torch.rand(16, 3, 8, 8)
    aug = E.Augmentation(pad=2, flip=True)
    a = E.augment(x, aug, torch.Generator().manual_seed(5))
    b = E.augment(x, aug, torch.Generator().manual_seed(5))
    c = E.augment(x, aug, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# training and features


def test_training_is_deterministic_and_leaves_global_rng_alone(small_digits):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    m1, h1 = E.train_encoder(
        small_digits.x_train, small_digits.y_train, 10, TINY_SETTINGS, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    m2, h2 = E.train_encoder(
        small_digits.x_train, small_digits.y_train, 10, TINY_SETTINGS, progress=False
    )
    f1, l1 = E.extract_features(m1, small_digits.x_test)
    f2, l2 = E.extract_features(m2, small_digits.x_test)
    np.testing.assert_array_equal(f1, f2)  # bitwise: same seed, same CPU
    np.testing.assert_array_equal(l1, l2)
    assert h1.epoch_loss == h2.epoch_loss and h1.epoch_acc == h2.epoch_acc
    m3, _ = E.train_encoder(
        small_digits.x_train,
        small_digits.y_train,
        10,
        TINY_SETTINGS.replace(seed=1),
        progress=False,
    )
    assert not np.array_equal(E.extract_features(m3, small_digits.x_test)[0], f1)


def test_training_learns(small_digits):
    settings = TINY_SETTINGS.replace(epochs=8, lr=1e-2)
    model, hist = E.train_encoder(
        small_digits.x_train, small_digits.y_train, 10, settings, progress=False
    )
    assert len(hist.epoch_loss) == 8 and len(hist.epoch_seconds) == 8
    # Measured: loss 2.26 -> 1.28. Learning starts slowly because the head sees unit-norm
    # features, so its logits can only grow as fast as its weights do.
    assert hist.epoch_loss[-1] < 0.7 * hist.epoch_loss[0]
    _, logits = E.extract_features(model, small_digits.x_test)
    acc = (logits.argmax(1) == small_digits.y_test).mean()
    # Measured 57% on these 100 test digits; chance is 10%, and 35 or more right out of 100 by
    # chance has probability below 1e-9, so passing proves learning with margin for other BLAS.
    assert acc > 0.35, acc


def test_extract_features_is_eval_mode_and_batch_independent(small_digits):
    model, _ = E.train_encoder(
        small_digits.x_train, small_digits.y_train, 10, TINY_SETTINGS, progress=False
    )
    # The training images' per-channel statistics travel with the model. Tolerance: float32
    # storage of float64 sums.
    x = small_digits.x_train.astype(np.float64)
    np.testing.assert_allclose(model.encoder.input_mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(model.encoder.input_std.numpy(), x.std(axis=(0, 2, 3)), rtol=1e-6)
    model.train()
    f_a, lg_a = E.extract_features(model, small_digits.x_test, batch_size=100)
    f_b, _ = E.extract_features(model, small_digits.x_test, batch_size=7)
    assert model.training  # restored
    # Eval-mode BatchNorm makes each row independent of its batch; tolerance covers the
    # float32 reduction order of different batch shapes.
    np.testing.assert_allclose(f_a, f_b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(f_a, axis=1), 1.0, atol=1e-5)
    assert f_a.shape == (100, 16) and lg_a.shape == (100, 10) and f_a.dtype == np.float32
    model.eval()
    with torch.no_grad():
        f_direct, lg_direct = model(torch.from_numpy(small_digits.x_test))
    np.testing.assert_allclose(f_a, f_direct.numpy(), atol=1e-5, rtol=0)
    f_aug, _ = E.extract_features(model, small_digits.x_test, augmentation=E.Augmentation(1, False))
    assert not np.allclose(f_aug, f_a)
    empty_f, empty_l = E.extract_features(model, small_digits.x_test[:0])
    assert empty_f.shape == (0, 16) and empty_l.shape == (0, 10)


def test_training_argument_checks(small_digits):
    x, y = small_digits.x_train[:10], small_digits.y_train[:10]
    with pytest.raises(ValueError, match="x_train must be 4-D"):
        E.train_encoder(x[:, 0], y, 10, TINY_SETTINGS, progress=False)
    with pytest.raises(ValueError, match=r"y_train must lie in 0\.\.9"):
        E.train_encoder(x, y + 10, 10, TINY_SETTINGS, progress=False)
    with pytest.raises(ValueError, match="y_train must be integer labels"):
        E.train_encoder(x, y[:5], 10, TINY_SETTINGS, progress=False)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x_train contains NaN"):
        E.train_encoder(bad, y, 10, TINY_SETTINGS, progress=False)
    with pytest.raises(ValueError, match="n_classes"):
        E.train_encoder(x, y, 1, TINY_SETTINGS, progress=False)
    with pytest.raises(ValueError, match="device"):
        E.train_encoder(x, y, 10, TINY_SETTINGS, device="mps", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            E.train_encoder(x, y, 10, TINY_SETTINGS, device="cuda", progress=False)
    with pytest.raises(TypeError, match="settings"):
        E.train_encoder(x, y, 10, {"epochs": 1}, progress=False)


def test_progress_bar_can_be_switched(small_digits, capsys):
    args = (small_digits.x_train[:64], small_digits.y_train[:64], 10, TINY_SETTINGS)
    E.train_encoder(*args, progress=False)
    assert capsys.readouterr().err == ""
    E.train_encoder(*args, progress=True)
    assert "encoder 1x8x8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# encode_dataset and its cache


def test_encode_dataset_caches_features(small_digits, tmp_path, monkeypatch):
    first = E.encode_dataset(small_digits, TINY_SETTINGS, cache_dir=tmp_path, progress=False)
    assert not first.from_cache
    assert first.features_train.shape == (300, 16) and first.features_test.shape == (100, 16)
    assert first.train_acc == (first.logits_train.argmax(1) == small_digits.y_train).mean()
    assert 0.0 <= first.train_acc_augmented <= 1.0 and len(first.history.epoch_acc) == 1
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_training(*a, **k):
        raise AssertionError("a cached result must not retrain")

    monkeypatch.setattr(E, "train_encoder", no_training)
    second = E.encode_dataset(small_digits, TINY_SETTINGS, cache_dir=tmp_path, progress=False)
    assert second.from_cache and second.key == first.key
    np.testing.assert_array_equal(second.features_train, first.features_train)
    np.testing.assert_array_equal(second.logits_test, first.logits_test)
    assert (second.train_acc, second.test_acc, second.train_acc_augmented) == (
        first.train_acc,
        first.test_acc,
        first.train_acc_augmented,
    )
    assert second.history.epoch_loss == first.history.epoch_loss
    monkeypatch.undo()

    # Other settings or other data: another key, so a new training run.
    other = E.encode_dataset(
        small_digits, TINY_SETTINGS.replace(seed=1), cache_dir=tmp_path, progress=False
    )
    assert not other.from_cache and other.key != first.key
    fewer = dataclasses.replace(
        small_digits, x_train=small_digits.x_train[:299], y_train=small_digits.y_train[:299]
    )
    assert (
        E.encode_dataset(fewer, TINY_SETTINGS, cache_dir=tmp_path, progress=False).key != first.key
    )

    # A damaged entry is recomputed, never returned; recomputation reproduces it exactly.
    entry = tmp_path / f"{first.key}.npz"
    entry.write_bytes(entry.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="recomputed"):
        again = E.encode_dataset(small_digits, TINY_SETTINGS, cache_dir=tmp_path, progress=False)
    assert not again.from_cache
    np.testing.assert_array_equal(again.features_train, first.features_train)


# ---------------------------------------------------------------- the blog's code, faithfully


def test_blog_initialisation_statistics(small_digits):
    """The blog's SmallAlexNet.init_weights_: every Conv2d and Linear weight of the encoder
    N(0, 0.02), every bias 0, BatchNorm weight 1 and bias 0; the head keeps PyTorch's default
    (the blog's nn.Linear(128, 10) is outside its init), U(-1/sqrt(128), 1/sqrt(128)) with
    std 1/sqrt(3 * 128) = 0.051. Checked on the blog's 32x32 layout at initialisation (epochs
    0): the std of each of its 1e5-1.7e7 weights within 2% of 0.02, mean within 5 standard
    errors of 0. Raw pixels: the input buffers stay 0 and 1."""
    settings = E.EncoderSettings(init="blog", standardize=False, shuffle=False, epochs=0)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    model, _ = E.train_encoder(x, np.arange(4) % 2, 2, settings, progress=False)
    layers = [
        m for m in model.encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert len(layers) == 8  # five convs, fc6, fc7, fc8
    for m in layers:
        w = m.weight.detach().double()
        assert w.std().item() == pytest.approx(0.02, rel=0.02)
        assert abs(w.mean().item()) < 5 * 0.02 / w.numel() ** 0.5
        assert m.bias is None or torch.all(m.bias == 0)
    for m in model.encoder.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.encoder.input_mean == 0) and torch.all(model.encoder.input_std == 1)
    head = model.head.weight.detach().double()
    assert head.abs().max().item() <= 1 / 128**0.5 and head.std().item() > 0.04
    # the package's default: PyTorch's init and standardised pixels
    default, _ = E.train_encoder(
        x, np.arange(4) % 2, 2, E.EncoderSettings(epochs=0), progress=False
    )
    assert default.encoder.conv[0][0].weight.std().item() > 0.1  # kaiming-uniform, fan-in 27
    assert not torch.all(default.encoder.input_mean == 0)


def test_unshuffled_training_visits_the_images_in_order(small_digits, monkeypatch):
    """shuffle=False (the blog's unshuffled DataLoader): every epoch's batches are the
    training images in their stored order."""
    seen = []
    real = E.augment

    def spy(x, aug, gen):
        seen.append(x.clone())
        return real(x, aug, gen)

    monkeypatch.setattr(E, "augment", spy)
    x = torch.as_tensor(small_digits.x_train[:96])
    settings = TINY_SETTINGS.replace(shuffle=False, epochs=2)
    E.train_encoder(x, small_digits.y_train[:96], 10, settings, progress=False)
    assert len(seen) == 6
    for i, b in enumerate(seen):
        start = 32 * (i % 3)
        assert torch.equal(b, x[start : start + 32])


def test_faithful_default_settings():
    for name in ("digits", "cifar10-subset"):
        plain, blog = E.default_settings(name), E.default_settings(name, faithful=True)
        assert (blog.init, blog.standardize, blog.shuffle) == ("blog", False, False)
        assert (plain.init, plain.standardize, plain.shuffle) == ("torch", True, True)
        assert dataclasses.replace(blog, init="torch", standardize=True, shuffle=True) == plain
    with pytest.raises(ValueError, match="init"):
        E.EncoderSettings(init="xavier")


def test_feature_dim_sets_the_width_of_fc8_only(small_digits, tmp_path):
    """The experiment's --feature-dim. Only fc8 (and so the head's input) changes;
    the default is the blog's 128; the width is part of the settings and so of the cache
    key; bad values are refused naming the argument."""
    for name in ("digits", "cifar10-subset"):
        plain, low = E.default_settings(name), E.default_settings(name, feature_dim=16)
        assert plain.arch.feat_dim == 128 and E.default_settings(name, feature_dim=None) == plain
        assert low.arch.feat_dim == 16
        assert dataclasses.replace(low.arch, feat_dim=128) == plain.arch
        assert dataclasses.replace(low, arch=plain.arch) == plain
        assert low.to_dict() != plain.to_dict()  # so the features' cache key differs
    assert E.default_settings("digits", faithful=True, feature_dim=8).init == "blog"
    for bad in (1, 0, -3, 4097, 16.0, "16", True):
        with pytest.raises(
            ValueError,
            match=r"^feature_dim must be None or an integer from 2 "
            r"to 4096, got ",
        ):
            E.default_settings("digits", feature_dim=bad)
    settings = TINY_SETTINGS.replace(arch=dataclasses.replace(TINY, feat_dim=3))
    first = E.encode_dataset(small_digits, settings, cache_dir=tmp_path, progress=False)
    assert first.features_train.shape == (300, 3) and first.logits_test.shape == (100, 10)
    np.testing.assert_allclose(np.linalg.norm(first.features_test, axis=1), 1.0, rtol=1e-5)
    wide = E.encode_dataset(small_digits, TINY_SETTINGS, cache_dir=tmp_path, progress=False)
    assert wide.key != first.key and not wide.from_cache


def test_the_shared_training_loop_is_the_loop_written_out(small_digits):
    """encoder.train_encoder runs through training.train_loop: the same permutation, crop and
    flip draws in the same order as the loop written out by hand (below, as it stood before the
    loop was shared), so the trained weights agree bit for bit."""
    import torch.nn.functional as F

    settings = E.default_settings("digits").replace(epochs=2, seed=4)
    x, y = small_digits.x_train, small_digits.y_train
    model, history = E.train_encoder(x, y, 10, settings, progress=False)

    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y, dtype=torch.long)
    n, c, h, w = xt.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        ref = E.EncoderClassifier(c, (h, w), 10, settings.arch)
    count = n * h * w
    mean = xt.sum(dim=(0, 2, 3), dtype=torch.float64) / count
    var = (xt * xt).sum(dim=(0, 2, 3), dtype=torch.float64) / count - mean * mean
    ref.encoder.set_input_stats(mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-6).float())
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(ref.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    losses = []
    for _ in range(settings.epochs):
        ref.train()
        order = torch.randperm(n, generator=gen)
        total = torch.zeros(())
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if idx.numel() < 2:
                continue
            _, logits = ref(E.augment(xt[idx], settings.augmentation, gen))
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        losses.append(float(total) / n)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert history.epoch_loss == losses
