"""Object removal over HTTP: ``POST /v1/images/erase``, the ``/erase`` page, dynamic batching, bounds, metrics.

``EraserConfig`` imports pydantic only; ``EraserService`` (FastAPI, torch and diffusers when started) is imported on
first use, so the service config can be read without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EraserConfig, EraserRayConfig

if TYPE_CHECKING:
    from .service import EraserService

__all__ = ["EraserConfig", "EraserRayConfig", "EraserService"]


def __getattr__(name: str):
    if name == "EraserService":
        from .service import EraserService

        return EraserService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
