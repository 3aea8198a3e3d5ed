"""Weight patches: the format, apply / revert / stack, and checkpoint folders patched on disk."""

from ..errors import PatchFormatError, PatchMismatchError, PatchStateError
from ..fingerprint import base_fingerprint, tensor_digest
from .apply import apply_patch, revert_patch, stack_patches
from .format import FORMAT_VERSION, PatchEntry, WeightPatch
from .integrity import UnverifiedPatchWarning
from .materialize import materialize

__all__ = [
    "FORMAT_VERSION",
    "PatchEntry",
    "PatchFormatError",
    "PatchMismatchError",
    "PatchStateError",
    "UnverifiedPatchWarning",
    "WeightPatch",
    "apply_patch",
    "base_fingerprint",
    "materialize",
    "revert_patch",
    "stack_patches",
    "tensor_digest",
]
