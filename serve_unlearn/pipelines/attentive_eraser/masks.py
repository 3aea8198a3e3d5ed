"""Masks: the pixel mask on the latent grid and on every UNet token grid, its dilation, and paste-back weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import EraserInputError


def latent_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, ceil(H/f), ceil(W/f)) latent mask: a latent pixel is foreground if any
    pixel under it is (the reference's max-pool, conservative)."""
    return F.max_pool2d(mask.float(), vae_scale_factor, ceil_mode=True)


def build_mask_pyramid(mask: torch.Tensor, vae_scale_factor: int, n_levels: int) -> dict[int, torch.Tensor]:
    """Foreground tokens per UNet token grid: {h_l * w_l: (B, h_l * w_l) bool}.

    Level 0 is the latent grid; each further level halves it with ceil, as the UNet's stride-2 convolutions (pad
    1) do, so non-square and non-power-of-two sizes line up with the token grids. Equal to the reference's direct
    ``max_pool2d(mask, R / r)`` when the sizes divide.
    """
    m = latent_mask(mask, vae_scale_factor)
    pyramid: dict[int, torch.Tensor] = {}
    for _ in range(n_levels):
        pyramid.setdefault(m.shape[-2] * m.shape[-1], m.flatten(1) > 0.5)
        m = F.max_pool2d(m, 2, ceil_mode=True)
    return pyramid


def gaussian_kernel1d(kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` kernel; its default sigma is 0.3 * ((k - 1) / 2 - 1) + 0.8."""
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8 if sigma is None else sigma
    x = torch.linspace(-(kernel_size - 1) * 0.5, (kernel_size - 1) * 0.5, kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def _blur(mask: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    k = kernel.numel()
    kernel = kernel.to(mask.device, mask.dtype)
    x = F.pad(mask, (k // 2,) * 4, mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, k))
    return F.conv2d(x, kernel.view(1, 1, k, 1))


def dilate_mask(mask: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The reference's mask preprocessing: Gaussian blur (kernel k, reflect padding as torchvision) then >= 0.1.

    For a straight edge this grows the mask by about 1.28 sigma; k <= 1 leaves it unchanged.
    """
    if kernel_size <= 1:
        return mask
    h, w = mask.shape[-2:]
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(h, w):
        raise EraserInputError(
            f"mask_dilation={kernel_size} must be an odd blur kernel smaller than twice the image side "
            f"({h}x{w}); use 'ae' (the reference's kernel scaled to the image) or 0 for none"
        )
    return (_blur(mask.float(), gaussian_kernel1d(kernel_size), "reflect") >= 0.1).to(mask.dtype)


def paste_back_weights(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """The reference's soft paste-back weight m_f = 1 - (1 - m)(1 - blur_radius(m)): 1 inside the mask, fading
    to 0 over about ``radius`` pixels outside it."""
    if radius <= 0:
        return mask
    kernel = gaussian_kernel1d(2 * math.ceil(3 * radius) + 1, sigma=radius)
    return 1 - (1 - mask) * (1 - _blur(mask.float(), kernel, "replicate").to(mask.dtype))
