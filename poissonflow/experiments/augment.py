"""Seeded augmentations for the self-supervised encoders (`poissonflow.experiments.ssl`), in pure
torch.

Each augmentation is a frozen dataclass: call it on a batch of [0, 1] images (N, C, H, W) with a
CPU `torch.Generator`; every random draw comes from that generator (one set of draws per image,
in a fixed order), so the same generator state gives bitwise the same views on the CPU, and the
draws do not depend on the images' device. `config()` is the JSON-able settings dict that goes
into cache keys.

| name | for | what |
|---|---|---|
| `CropFlip` | the supervised encoder | zero-pad by `pad`, crop back at a random offset, optional horizontal flip (the blog's random crop and flip) |
| `DigitsAugment` | 8x8 digits | random integer shift by up to `max_shift` pixels per axis (zero fill), then Gaussian pixel noise of std `noise_std`, clipped to [0, 1] |
| `CifarAugment` | 32x32 RGB | SimCLR's CIFAR-10 pipeline: random resized crop, horizontal flip, colour jitter (probability 0.8), random grayscale (0.2) |

`CifarAugment` against torchvision's transforms (what SimCLR's and Wang & Isola's code call):

| step | torchvision | here |
|---|---|---|
| RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) | up to 10 rejection draws of (area, log-ratio), then a centre-crop fallback | the same draws, but a box that does not fit is shrunk to fit instead of redrawn (one draw per image, so the number of draws is fixed); bilinear resampling by `grid_sample` (align_corners=False) without antialiasing |
| ColorJitter(0.4, 0.4, 0.4, 0.1) | the four factors in a random order per image | fixed order brightness, contrast, saturation, hue |
| hue | a shift in HSV space | a rotation of the chroma plane in YIQ space by 2*pi*h (the same hue wheel up to the RGB gamut's clipping), clipped to [0, 1] |
| RandomGrayscale(0.2) | ITU-R 601 luma | the same weights (0.299, 0.587, 0.114) |

Digits (8x8, 1 channel) take no crop-resize, flip or colour: a mirrored digit is another shape
(the supervised encoder's reason for no flip, `poissonflow/experiments/encoder.py`), and a resized
crop of
an 8x8 image leaves little of it; a one-pixel shift is the supervised encoder's pad-1 crop.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.nn import functional as F

__all__ = ["CropFlip", "DigitsAugment", "CifarAugment", "augmentation_for", "check_images"]

_LUMA = (0.299, 0.587, 0.114)


def check_images(x, name: str = "x") -> torch.Tensor:
    """x as a float (N, C, H, W) tensor with finite values; TypeError/ValueError naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating-point images in [0, 1], got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    return generator


def _real(value, name: str, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class CropFlip:
    """Random crop (zero-pad by `pad`, crop back) and horizontal `flip`, one draw per image:
    the supervised encoder's augmentation (the blog's). Pad 0 and no flip turn it off.

    The window's offset (oy, ox) ~ U{0..2*pad}^2; a flipped image reads its window's columns
    right to left. The draws (oy, ox, then the flips) come from `generator` (a CPU generator),
    so they do not depend on the images' device. Its fields are what cache keys hold
    (EncoderSettings.to_dict)."""

    pad: int = 4
    flip: bool = True

    def __post_init__(self):
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"pad must be a non-negative int, got {self.pad!r}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {type(self.flip).__name__}")

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip

    def config(self) -> dict:
        return {"name": "crop_flip", **dataclasses.asdict(self)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.active:
            return x
        n, c, h, w = x.shape
        p = self.pad
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        cols = torch.arange(w).expand(n, w)
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            cols = torch.where(flip[:, None], w - 1 - cols, cols)
        rows = (oy[:, None] + torch.arange(h)).to(x.device)
        cols = (ox[:, None] + cols).to(x.device)
        padded = F.pad(x, (p, p, p, p)) if p else x
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


@dataclasses.dataclass(frozen=True)
class DigitsAugment:
    """Random shift (integer, up to `max_shift` pixels along each axis, zero fill) and Gaussian
    pixel noise (std `noise_std`), clipped to [0, 1]. Draw order per batch: row shifts, column
    shifts (N each), then the noise (N x C x H x W)."""

    max_shift: int = 1
    noise_std: float = 0.1

    def __post_init__(self):
        if (
            isinstance(self.max_shift, bool)
            or not isinstance(self.max_shift, int)
            or self.max_shift < 0
        ):
            raise ValueError(f"max_shift must be a non-negative int, got {self.max_shift!r}")
        _real(self.noise_std, "noise_std", 0.0)

    def config(self) -> dict:
        return {"kind": "digits", **dataclasses.asdict(self)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = check_images(x)
        gen = _check_generator(generator)
        n, c, h, w = x.shape
        p = self.max_shift
        out = x
        if p > 0 and n:
            dy = torch.randint(-p, p + 1, (n,), generator=gen)
            dx = torch.randint(-p, p + 1, (n,), generator=gen)
            # window of the zero-padded image at offset (p - dy, p - dx): content moves by (dy, dx)
            rows = (p - dy)[:, None] + torch.arange(h)
            cols = (p - dx)[:, None] + torch.arange(w)
            padded = F.pad(x, (p, p, p, p))
            b = torch.arange(n, device=x.device)[:, None, None, None]
            ch = torch.arange(c, device=x.device)[None, :, None, None]
            out = padded[
                b, ch, rows.to(x.device)[:, None, :, None], cols.to(x.device)[:, None, None, :]
            ]
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            out = (out + self.noise_std * noise).clamp_(0.0, 1.0)
        return out.contiguous()


@dataclasses.dataclass(frozen=True)
class CifarAugment:
    """SimCLR's CIFAR-10 augmentation (module docstring for the differences from torchvision).
    Draw order per batch: crop areas, log-ratios, centres (y, x), flips, jitter gate, the four
    jitter factors, grayscale gate; N draws each."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self):
        for name in ("scale", "ratio"):
            v = tuple(getattr(self, name))
            if len(v) != 2:
                raise ValueError(f"{name} must be a pair (lo, hi), got {getattr(self, name)!r}")
            lo = _real(v[0], f"{name}[0]", 0.0)
            hi = _real(v[1], f"{name}[1]", 0.0)
            if not 0 < lo <= hi or (name == "scale" and hi > 1):
                raise ValueError(
                    f"{name} must satisfy 0 < lo <= hi{' <= 1' if name == 'scale' else ''}, "
                    f"got {v!r}"
                )
            object.__setattr__(self, name, (lo, hi))
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {type(self.flip).__name__}")
        for name in ("brightness", "contrast", "saturation"):
            _real(getattr(self, name), name, 0.0, 1.0)
        _real(self.hue, "hue", 0.0, 0.5)
        _real(self.jitter_p, "jitter_p", 0.0, 1.0)
        _real(self.grayscale_p, "grayscale_p", 0.0, 1.0)

    def config(self) -> dict:
        return {"kind": "cifar", **dataclasses.asdict(self)}

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = check_images(x)
        gen = _check_generator(generator)
        n, c, h, w = x.shape
        if c != 3:
            raise ValueError(f"x must have 3 (RGB) channels for CifarAugment, got {c}")
        if n == 0:
            return x
        u = lambda: torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
        lo, hi = self.scale
        area = lo + (hi - lo) * u()
        lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lr0 + (lr1 - lr0) * u())
        # crop size as fractions of the image side; shrunk to fit (module docstring)
        fw = torch.sqrt(area * aspect).clamp(max=1.0)
        fh = torch.sqrt(area / aspect).clamp(max=1.0)
        cy = (fh / 2) + (1 - fh) * u()
        cx = (fw / 2) + (1 - fw) * u()
        flip = u() < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        jit = u() < self.jitter_p
        fb = 1 + self.brightness * (2 * u() - 1)
        fc = 1 + self.contrast * (2 * u() - 1)
        fs = 1 + self.saturation * (2 * u() - 1)
        fhue = self.hue * (2 * u() - 1)
        gray = u() < self.grayscale_p

        sx = torch.where(flip, -fw, fw)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * cx - 1
        theta[:, 1, 1], theta[:, 1, 2] = fh, 2 * cy - 1
        grid = F.affine_grid(theta.to(x.dtype), [n, c, h, w], align_corners=False)
        out = F.grid_sample(
            x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False
        )

        dev, dt = x.device, x.dtype
        col = lambda t: t.to(dev, dt)[:, None, None, None]  # noqa: E731
        j = col(jit.double())
        luma = torch.tensor(_LUMA, device=dev, dtype=dt)[None, :, None, None]

        def blend(img, other, factor):
            return (factor * img + (1 - factor) * other).clamp(0.0, 1.0)

        y = out
        y = blend(y, torch.zeros_like(y), col(fb))
        mean_gray = (y * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        y = blend(y, mean_gray.expand_as(y), col(fc))
        g = (y * luma).sum(1, keepdim=True)
        y = blend(y, g.expand_as(y), col(fs))
        y = _rotate_hue(y, fhue.to(dev, dt))
        out = j * y + (1 - j) * out
        g = (out * luma).sum(1, keepdim=True).expand_as(out)
        gm = col(gray.double())
        return (gm * g + (1 - gm) * out).contiguous()


# RGB <-> YIQ (NTSC 1953 matrix)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rotate_hue(img: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotates the (I, Q) chroma plane of each image by 2*pi*h[i]; clipped to [0, 1]."""
    m = torch.tensor(_YIQ, dtype=img.dtype, device=img.device)
    minv = torch.linalg.inv(m)
    yiq = torch.einsum("ij,njhw->nihw", m, img)
    a = 2 * math.pi * h
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,njhw->nihw", minv, yiq).clamp(0.0, 1.0)


def augmentation_for(dataset_name: str):
    """The default augmentation of a data set: DigitsAugment() for digits, CifarAugment() for
    cifar10 and cifar10-subset."""
    if dataset_name == "digits":
        return DigitsAugment()
    if dataset_name in ("cifar10", "cifar10-subset"):
        return CifarAugment()
    raise ValueError(
        f"dataset_name must be 'digits', 'cifar10' or 'cifar10-subset', got {dataset_name!r}"
    )
