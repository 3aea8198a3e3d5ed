"""serve-unlearn: make a deployed model forget at serving time, without retraining it."""

from .patches import apply_patch, revert_patch

__version__ = "0.1.0"
__all__ = ["__version__", "apply_patch", "revert_patch"]
