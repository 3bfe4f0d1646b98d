"""Structured inputs for the random-weight model families: crops of the two real photographs
scikit-learn ships (sklearn.datasets.load_sample_images: a temple in China, a flower), at random
positions and scales, resized and normalized with ImageNet's mean and std. Not white noise: the
statistics (smooth regions, edges, colour correlations) are those of natural images."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None] for img in load_sample_images().images)


def crops(n: int, size: int, seed: int) -> torch.Tensor:
    """n normalized crops (n, 3, size, size); `seed` picks positions and scales."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[-2:]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[..., y : y + side, x : x + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return (torch.cat(out) - MEAN) / STD


def calibration_loader(size: int = 224, num_samples: int = 16, batch_size: int = 4) -> list[torch.Tensor]:
    """Calibration batches for the random-weight families (`bench.images:calibration_loader`)."""
    x = crops(num_samples, size, seed=0)
    return [x[i : i + batch_size] for i in range(0, num_samples, batch_size)]
