"""Tiny models built offline from configs, for tests, benchmarks and examples (no hub, seeded)."""

from .tiny_models import build_tiny_llama, build_tiny_mlp, build_tiny_unet

__all__ = ["build_tiny_llama", "build_tiny_mlp", "build_tiny_unet"]
