"""Seeded augmentations of the self-supervised encoders (poissonflow/experiments/augment.py)."""

from __future__ import annotations

import pytest
import torch

from poissonflow.experiments.augment import CifarAugment, DigitsAugment, augmentation_for


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=6, c=1, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=gen(seed))


@pytest.mark.parametrize("aug, c, size", [(DigitsAugment(), 1, 8), (CifarAugment(), 3, 32)])
def test_deterministic_given_generator(aug, c, size):
    x = images(5, c, size, size)
    a, b = aug(x, gen(3)), aug(x, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, gen(4)))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # one draw set per image: two calls on one generator give two different views
    g = gen(3)
    assert not torch.equal(aug(x, g), aug(x, g))


def test_digits_shift_is_a_shift_with_zero_fill():
    x = images(20)
    out = DigitsAugment(max_shift=1, noise_std=0.0)(x, gen(1))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(out[i, 0], padded[i, 0, 1 - dy : 9 - dy, 1 - dx : 9 - dx])
        ]
        assert matches, f"image {i} is not a shift of its input"
        seen.add(matches[0])
    assert len(seen) >= 4  # the shifts vary between images


def test_digits_noise_has_the_stated_std():
    x = torch.full((200, 1, 8, 8), 0.5)
    out = DigitsAugment(max_shift=0, noise_std=0.1)(x, gen(2))
    assert abs(float((out - x).std()) - 0.1) < 0.005
    assert abs(float((out - x).mean())) < 0.005
    assert torch.equal(DigitsAugment(max_shift=0, noise_std=0.0)(x, gen(2)), x)


def test_cifar_identity_settings_reproduce_the_image():
    x = images(4, 3, 32, 32)
    ident = CifarAugment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0
    )
    assert torch.allclose(ident(x, gen(0)), x, atol=1e-5)


def test_cifar_flip_mirrors_or_keeps():
    x = images(16, 3, 32, 32)
    aug = CifarAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, jitter_p=0.0, grayscale_p=0.0)
    out = aug(x, gen(5))
    kinds = []
    for i in range(len(x)):
        same = torch.allclose(out[i], x[i], atol=1e-5)
        mirrored = torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
        assert same or mirrored
        kinds.append(mirrored)
    assert 0 < sum(kinds) < len(kinds)


def test_cifar_crop_zooms_in():
    # a crop of at most 25% of the area, resized back, stretches a vertical edge
    x = torch.zeros(1, 3, 32, 32)
    x[..., 16:] = 1.0
    aug = CifarAugment(
        scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0
    )
    out = aug(x.expand(8, -1, -1, -1).contiguous(), gen(0))
    fraction_bright = out[:, 0].mean(dim=(1, 2))
    assert float((fraction_bright - 0.5).abs().max()) > 0.1  # not the uncropped 50 / 50


def test_cifar_grayscale_and_jitter():
    x = images(8, 3, 32, 32)
    gray = CifarAugment(jitter_p=0.0, grayscale_p=1.0)(x, gen(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    base = CifarAugment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=0.0, grayscale_p=0.0
    )
    jit = CifarAugment(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=1.0, grayscale_p=0.0
    )
    assert (jit(x, gen(0)) - base(x, gen(0))).abs().mean() > 0.02


def test_hue_rotation_by_zero_is_identity():
    from poissonflow.experiments.augment import _rotate_hue

    x = images(3, 3, 8, 8)
    assert torch.allclose(_rotate_hue(x, torch.zeros(3)), x, atol=1e-5)


def test_augmentation_for():
    assert isinstance(augmentation_for("digits"), DigitsAugment)
    assert isinstance(augmentation_for("cifar10-subset"), CifarAugment)
    with pytest.raises(ValueError, match="dataset_name"):
        augmentation_for("mnist")


def test_bad_input():
    aug = DigitsAugment()
    with pytest.raises(ValueError, match="x must be 4-D"):
        aug(torch.rand(8, 8), gen())
    with pytest.raises(TypeError, match="x must be floating"):
        aug(torch.zeros(1, 1, 8, 8, dtype=torch.int64), gen())
    with pytest.raises(ValueError, match="NaN"):
        aug(torch.full((1, 1, 8, 8), float("nan")), gen())
    with pytest.raises(TypeError, match="generator"):
        aug(images(), 0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        aug(images().numpy(), gen())
    with pytest.raises(ValueError, match="noise_std"):
        DigitsAugment(noise_std=-1.0)
    with pytest.raises(ValueError, match="max_shift"):
        DigitsAugment(max_shift=1.5)
    with pytest.raises(ValueError, match="scale"):
        CifarAugment(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        CifarAugment(hue=0.7)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        CifarAugment()(images(2, 1, 32, 32), gen())
