"""Typed errors a user can cause. Each message says what to do; none leaves a model half-changed."""


class ServeUnlearnError(Exception):
    """Base class of every error serve-unlearn raises on purpose."""


class PatchFormatError(ServeUnlearnError, ValueError):
    """The patch file is corrupt, truncated, or not a serve-unlearn patch."""


class PatchMismatchError(ServeUnlearnError, ValueError):
    """The patch does not fit the model: another base, a missing tensor, a shape or dtype that differs."""


class PatchStateError(ServeUnlearnError, RuntimeError):
    """The model is not in the state the operation needs (e.g. reverting a patch that is not applied)."""


class UnlearnDataError(ServeUnlearnError, ValueError):
    """Forget or retain data is empty or malformed."""


class UnlearnConfigError(ServeUnlearnError, ValueError):
    """A hyperparameter is out of range (e.g. a mask ratio outside (0, 1])."""
