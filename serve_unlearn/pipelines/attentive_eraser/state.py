"""The state every ASS processor of one pipeline call reads: the mask per token grid, the backend and the step.

The pipeline builds one :class:`AttentionRedirectionState` per call and advances it before each UNet call (the
analogue of a guider's ``set_state``); the processors only read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...errors import UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedirectionLevel:
    """The redirected chunk's view of one token grid: which keys stay, how queries are scaled, who falls back."""

    keep: torch.Tensor  # (B, N) bool, True = background key (attendable)
    query_scale: torch.Tensor | None  # (B, N) float: lambda on foreground rows while SS is on, else None
    ok: torch.Tensor  # (B,) bool: samples with at least one background key at this level
    any_empty: bool
    all_empty: bool


@dataclass
class AttentionRedirectionState:
    """Everything the ASS processors of one pipeline call read: the foreground tokens per token grid (built once
    per call), the attention backend, and the executed-step index with the ASS and SS windows (advanced by the
    pipeline before each UNet call, the analogue of a guider's ``set_state``)."""

    fg: dict[int, torch.Tensor]  # tokens per grid (h*w) -> (B, N) bool, True = foreground (to remove)
    ss_scale: float = 0.3
    backend: str = "auto"
    step: int = -1
    active: bool = False
    ss_active: bool = False
    _levels: dict = field(default_factory=dict, repr=False)
    _warned: bool = field(default=False, repr=False)

    def set_step(self, step: int, *, active: bool, ss_active: bool) -> None:
        self.step, self.active, self.ss_active = step, active, active and ss_active

    def level(self, tokens: int, device: torch.device, batch: int) -> RedirectionLevel:
        """The masks for a self-attention over ``tokens`` tokens, cached per device and SS phase."""
        cache_key = (tokens, str(device), self.ss_active)
        found = self._levels.get(cache_key)
        if found is not None:
            return found
        fg = self.fg.get(tokens)
        if fg is None:
            raise UnsupportedModelError(
                f"a self-attention over {tokens} tokens matches no level of the mask pyramid "
                f"({sorted(self.fg)}): this UNet's token grids are not the latent halved per down block"
            )
        if fg.shape[0] != batch:
            raise UnsupportedModelError(f"the redirected chunk has {batch} samples but the masks {fg.shape[0]}")
        fg = fg.to(device)
        keep = ~fg
        ok = keep.any(dim=1)
        n_ok = int(ok.sum())
        if n_ok < batch and not self._warned:
            self._warned = True
            logger.warning(
                "the mask covers the whole %d-token grid of sample(s) %s: those samples use plain attention at that "
                "level (nothing is left to redirect to); use a smaller mask or a larger image",
                tokens, (~ok).nonzero().flatten().tolist(),
            )
        scale = torch.where(fg, self.ss_scale, 1.0) if self.ss_active else None
        found = RedirectionLevel(keep, scale, ok, n_ok < batch, n_ok == 0)
        self._levels[cache_key] = found
        return found
