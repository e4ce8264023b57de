"""Photographs that ship inside scikit-image (``skimage/data``), cut into crops for 2× super-resolution.

No download: the files are read from the installed package.  The
high-resolution crop is the target; its 2× box-filtered reduction (each
low-resolution pixel the mean of 2 × 2) is the input.  ``scikit-image`` is
the optional extra ``images`` (``pip install -e '.[images]'``): it is 30 MB
with its own dependencies, for one demo.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TRAINING = (
    "astronaut.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "brick.png",
    "grass.png",
    "coins.png",
    "page.png",
    "moon.png",
)
"""The training photographs (``skimage/data`` file names)."""

HELD_OUT = ("chelsea.png", "camera.png")
"""The photographs evaluation uses, never trained on."""


def image_folder() -> str:
    """Return scikit-image's data folder; refuse, with ``ImportError``, when scikit-image is not installed."""
    try:
        import skimage
    except ImportError:
        raise ImportError(
            "the superres demo reads the photographs scikit-image ships: "
            "pip install -e '.[images]' (or pip install scikit-image)"
        ) from None
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def load_image(name: str) -> torch.Tensor:
    """Return one photograph as float32 ``(3, height, width)`` in [0, 1] (grey ones repeated over 3 channels)."""
    from skimage.io import imread

    pixels = torch.from_numpy(imread(os.path.join(image_folder(), name))).float() / 255.0
    pixels = pixels[..., None].expand(*pixels.shape, 3) if pixels.dim() == 2 else pixels[..., :3]
    return pixels.permute(2, 0, 1).contiguous()


def downscale(images: torch.Tensor) -> torch.Tensor:
    """Return the 2× reduction of ``(batch, 3, 2h, 2w)`` images: each pixel the mean of a 2 × 2 block."""
    return F.avg_pool2d(images, 2)


def bicubic(images: torch.Tensor) -> torch.Tensor:
    """Return the 2× bicubic enlargement of low-resolution images, clamped to [0, 1]: the baseline to beat."""
    return F.interpolate(images, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)


def psnr(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Return the peak signal-to-noise ratio of images in [0, 1], in decibels."""
    error = float(F.mse_loss(found.detach().clamp(0, 1).double(), truth.double()))
    return 10.0 * math.log10(1.0 / max(error, 1e-12))


@dataclass(frozen=True)
class Photographs:
    """Photographs to cut random crops from."""

    images: tuple[torch.Tensor, ...]
    name: str

    @classmethod
    def load(cls, names: tuple[str, ...]) -> Photographs:
        """Return the named photographs of ``skimage/data``."""
        return cls(tuple(load_image(name) for name in names), f"{len(names)} photographs of skimage/data")

    def batch(self, size: int, crop: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(low-resolution inputs, high-resolution targets)`` of ``size`` random ``crop`` × ``crop`` crops.

        A photograph is drawn in proportion to its area, then a position in it.
        """
        areas = torch.tensor([float(image.shape[1] * image.shape[2]) for image in self.images])
        crops = []
        for index in torch.multinomial(areas, size, replacement=True, generator=generator).tolist():
            image = self.images[index]
            top = int(torch.randint(0, image.shape[1] - crop + 1, (1,), generator=generator))
            left = int(torch.randint(0, image.shape[2] - crop + 1, (1,), generator=generator))
            crops.append(image[:, top : top + crop, left : left + crop])
        targets = torch.stack(crops)
        return downscale(targets), targets

    def centre_crops(self, count: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``count`` fixed crops (spread over the photographs and across each one) for evaluation."""
        crops = []
        for number in range(count):
            image = self.images[number % len(self.images)]
            share = (number // len(self.images) + 1) / (count // len(self.images) + 2)
            top, left = int((image.shape[1] - crop) * share), int((image.shape[2] - crop) * share)
            crops.append(image[:, top : top + crop, left : left + crop])
        targets = torch.stack(crops)
        return downscale(targets), targets
