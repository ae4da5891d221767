"""DINOv2 multi-crop augmentation, batched on the training device with kornia.

Per image: 2 global crops and N local crops, each a random resized crop (bicubic) with a
horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1;
p 0.8), grayscale (p 0.2) and Gaussian blur (sigma in [0.1, 2]); the second global crop is also
solarised (p 0.2). Blur probabilities are global 1 / global 2 / local = 1.0 / 0.1 / 0.5 nominally;
the original applied them inverted (0.0 / 0.9 / 0.5), and its released models were trained so:
``original_blur_probabilities`` chooses, and the choice is part of the logged config.

Why batched: decoding gives fixed-size uint8 images, and one kornia call per crop type
augments the whole batch on the device, with no per-image Python in the data workers.
Randomness comes from torch's generator on the device, which checkpoints save and restore.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from dinoflow.config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128 / 255


def blur_probabilities(original: bool) -> tuple[float, float, float]:
    """Blur probability of (global crop 1, global crop 2, local crops)."""
    return (0.0, 0.9, 0.5) if original else (1.0, 0.1, 0.5)


def _pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
              blur_kernel: int) -> nn.Sequential:
    steps: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=scale, resample="BICUBIC"),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        kernel = blur_kernel if blur_kernel % 2 else blur_kernel + 1
        steps.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=blur_p))
    if solarize_p > 0:
        steps.append(K.RandomSolarize(thresholds=(SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD),
                                      additions=(0.0, 0.0), p=solarize_p))
    steps.append(K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)))
    return nn.Sequential(*steps)


class MultiCrop(nn.Module):
    """uint8 images ``(B, 3, S, S)`` -> global crops ``(2, B, 3, G, G)`` and local crops
    ``(L, B, 3, l, l)``, normalised with ImageNet statistics."""

    def __init__(self, crops: CropsConfig) -> None:
        super().__init__()
        blur_1, blur_2, blur_local = blur_probabilities(crops.original_blur_probabilities)
        self.num_local_crops = crops.num_local_crops
        self.global_1 = _pipeline(crops.global_crop_size, crops.global_crop_scale, blur_1, 0.0, crops.blur_kernel_size)
        self.global_2 = _pipeline(crops.global_crop_size, crops.global_crop_scale, blur_2, 0.2, crops.blur_kernel_size)
        self.local = _pipeline(crops.local_crop_size, crops.local_crop_scale, blur_local, 0.0, crops.blur_kernel_size)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        pixels = images.float() / 255
        globals_ = torch.stack([self.global_1(pixels), self.global_2(pixels)])
        if self.num_local_crops == 0:
            return globals_, pixels.new_zeros((0, len(images), 3, 1, 1))
        # all local crops of the batch in one call: (L * B, 3, S, S)
        repeated = pixels.repeat(self.num_local_crops, 1, 1, 1)
        crops = self.local(repeated)
        return globals_, crops.view(self.num_local_crops, len(images), *crops.shape[1:])
