"""Natural photographs that ship offline, cut into random crops for ImageNet classifiers.

Sources: scikit-image's bundled sample images (skimage.data), scikit-learn's
`load_sample_images()` and matplotlib's sample data. They are split by *source photo*: the
calibration crops and the evaluation crops never come from the same photograph (the stereo pair
motorcycle_left / motorcycle_right is one scene and stays on one side).

Crops are Inception-style random resized crops (area share, aspect ratio, horizontal flip),
resized with bicubic antialiasing to the model's input size and normalized as the model's
weights expect (`Preprocess`). Everything is seeded: the same call gives the same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# name -> (library, loader key); grayscale photos are repeated over the three channels
CALIBRATION_PHOTOS = ("china", "flower", "rocket", "hubble_deep_field", "motorcycle_left", "motorcycle_right", "coins")
EVALUATION_PHOTOS = ("astronaut", "chelsea", "coffee", "grace_hopper", "camera")
_SKIMAGE = {"rocket", "hubble_deep_field", "motorcycle_left", "motorcycle_right", "coins", "astronaut", "chelsea", "coffee", "camera"}
_SKLEARN = {"china": 0, "flower": 1}
_MATPLOTLIB = {"grace_hopper": "grace_hopper.jpg"}

# Inception-style crop: share of the photo's area and aspect ratio (torchvision's
# RandomResizedCrop draws the same way); the lower area bound is higher than training's 0.08 so
# that a crop still shows an object, not a few upscaled pixels.
AREA = (0.15, 1.0)
ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Preprocess:
    """How pixels in [0, 255] become the model's input: (x - mean) / std per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def _load(name: str) -> np.ndarray:
    if name in _SKIMAGE:
        import skimage.data

        if name.startswith("motorcycle_"):  # one stereo pair: (left, right, disparity)
            return skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        return getattr(skimage.data, name)()
    if name in _SKLEARN:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[_SKLEARN[name]]
    if name in _MATPLOTLIB:
        import matplotlib.cbook
        import matplotlib.image

        with matplotlib.cbook.get_sample_data(_MATPLOTLIB[name]) as f:
            return matplotlib.image.imread(f)
    raise KeyError(f"unknown photo {name!r}; known: {', '.join(CALIBRATION_PHOTOS + EVALUATION_PHOTOS)}")


@lru_cache(maxsize=None)
def photo(name: str) -> torch.Tensor:
    """One photo as float pixels in [0, 255], shape (1, 3, H, W)."""
    a = np.asarray(_load(name))
    if a.dtype != np.uint8:  # matplotlib reads PNGs as floats in [0, 1]
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]  # drop an alpha channel
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]


def center_crop(name: str, size: int, preprocess: Preprocess, crop_padding: int = 32) -> torch.Tensor:
    """The evaluation crop EfficientNet's reference code takes: the central size / (size +
    crop_padding) of the short side, resized to size x size."""
    x = photo(name)
    h, w = x.shape[-2:]
    side = int(min(h, w) * size / (size + crop_padding))
    y0, x0 = (h - side) // 2, (w - side) // 2
    return preprocess(_resize(x[..., y0 : y0 + side, x0 : x0 + side], size))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 255.0)


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    for _ in range(10):
        area = h * w * rng.uniform(*AREA)
        aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)  # torchvision's fallback: the central square
    return (h - side) // 2, (w - side) // 2, side, side


def random_crops(names: tuple[str, ...], n: int, size: int, preprocess: Preprocess, seed: int) -> torch.Tensor:
    """n preprocessed crops (n, 3, size, size), taken from `names` in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = photo(names[i % len(names)])
        y0, x0, ch, cw = _random_box(rng, *x.shape[-2:])
        crop = x[..., y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out.append(_resize(crop, size))
    return preprocess(torch.cat(out))


def calibration_crops(n: int, size: int, preprocess: Preprocess, seed: int = 0) -> torch.Tensor:
    return random_crops(CALIBRATION_PHOTOS, n, size, preprocess, seed)


def evaluation_crops(n: int, size: int, preprocess: Preprocess, seed: int = 1000) -> torch.Tensor:
    return random_crops(EVALUATION_PHOTOS, n, size, preprocess, seed)
