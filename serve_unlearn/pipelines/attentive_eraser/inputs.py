"""The images and masks a caller gives a pipeline: checked, normalised for diffusers' processors, batched."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

from ...errors import EraserInputError


def image_size(x: Any) -> tuple[int, int] | None:
    """(height, width) of an image or mask input (PIL, numpy HW/HWC/BHW/BHWC, torch HW/CHW/BCHW), or a list."""
    if isinstance(x, (list, tuple)):
        return image_size(x[0]) if x else None
    if isinstance(x, PIL.Image.Image):
        return x.height, x.width
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[-2:]) if x.dim() >= 2 else None
    if isinstance(x, np.ndarray):
        if x.ndim == 2:
            return x.shape
        if x.ndim == 3:
            return x.shape[:2] if x.shape[-1] in (1, 3, 4) else x.shape[1:]
        if x.ndim == 4:
            return x.shape[1:3]
    return None


def as_processor_input(x: Any, name: str) -> Any:
    """Check an image/mask input and normalise what diffusers' processors would misread.

    Tensors may sit on any device and be any float dtype (or bool for masks); integer tensors are ambiguous
    (0..1 or 0..255?) and meta tensors hold no data, so both are refused. uint8 arrays are taken as 0..255.
    """
    if isinstance(x, (list, tuple)):
        if not x:
            raise EraserInputError(f"{name} is an empty list: give at least one image")
        return [as_processor_input(e, name) for e in x]
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise EraserInputError(f"{name} is a meta tensor (no data): load or materialise it first")
        if x.dtype == torch.bool:
            return x.float().cpu()
        if not x.is_floating_point():
            raise EraserInputError(
                f"{name} is a {x.dtype} tensor: give a float tensor in [0, 1] (channels first), a bool mask, a PIL "
                "image or a numpy array"
            )
        return x.detach().float().cpu()
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        if x.dtype == bool:
            return x.astype(np.float32)
        if not np.issubdtype(x.dtype, np.floating):
            raise EraserInputError(f"{name} is a {x.dtype} array: give floats in [0, 1] or uint8 in [0, 255]")
        return x.astype(np.float32)
    if isinstance(x, PIL.Image.Image):
        return x
    raise EraserInputError(f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them; got "
                           f"{type(x).__name__}")


def expand_batch(t: torch.Tensor, n: int, per_item: int, what: str) -> torch.Tensor:
    """Tile ``t`` (leading dim dividing ``n``) to ``n`` items, then repeat each item ``per_item`` times."""
    if n % t.shape[0]:
        raise EraserInputError(f"{t.shape[0]} {what} cannot be matched to a batch of {n}: give 1 or {n}")
    return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1))).repeat_interleave(per_item, dim=0)
