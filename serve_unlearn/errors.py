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


class RegistryError(ServeUnlearnError, RuntimeError):
    """The forget-request registry is missing, corrupt, or was written by a newer serve-unlearn."""


class UnknownRequestError(ServeUnlearnError, KeyError):
    """No forget request with that name or id is in the registry (``serve-unlearn o3 list`` shows them)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConflictError(ServeUnlearnError, RuntimeError):
    """The operation does not fit the current state: a name already in use, a request not in a status it applies
    to (retrying one that did not fail, retiring one already retired)."""


class ArtifactError(ServeUnlearnError, ValueError):
    """A forget request's artifact (detector, adapter) is missing, corrupt, or built for another backbone/base."""


class GateInputError(ServeUnlearnError, TypeError):
    """A prompt given to the gate is not text (a string, a list of strings, or chat messages)."""


class ServerError(ServeUnlearnError, RuntimeError):
    """A running vLLM server refused or failed an operation (e.g. runtime LoRA loading is not enabled)."""


class EraserInputError(ServeUnlearnError, ValueError):
    """An image, mask or argument given to an Attentive Eraser pipeline cannot be used as it is."""


class UnsupportedModelError(ServeUnlearnError, TypeError):
    """The pipeline's denoiser is not one Attentive Eraser supports (it needs a 4-channel UNet2DConditionModel)."""


class UntrustedCodeError(ServeUnlearnError, ValueError):
    """A data file names code to run (a module folder's class) that the caller did not allow; nothing was imported."""


class ModuleFolderError(ServeUnlearnError, ValueError):
    """A module folder (``serve_unlearn_module.json`` + ``model.safetensors``) is malformed or its class is unusable."""


class EvalDataError(UnlearnDataError):
    """An evaluation data file or a request's probes are missing, empty, not UTF-8 or lack a field."""


class EvidenceError(ServeUnlearnError, ValueError):
    """A verification record is unsigned, its signature does not match (it was changed after signing, or the key
    differs), or it is not a serve-unlearn verification record."""
