"""Real small models that ship inside PyPI packages, prepared offline (the pip registry is the only network used)."""

from .packaged import ModelPrepError, default_cache_dir, minilm_path, prepare_smollm2

__all__ = ["ModelPrepError", "default_cache_dir", "minilm_path", "prepare_smollm2"]
