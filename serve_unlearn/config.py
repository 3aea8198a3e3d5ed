"""The base of every serve-unlearn config: pydantic, strict about keys, loadable from YAML with overrides.

A typo in a YAML file or a keyword fails with :class:`~serve_unlearn.errors.UnlearnConfigError` before any
training or serving starts.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UnlearnConfigError

__all__ = ["StrictConfig"]


class StrictConfig(BaseModel):
    """A pydantic model that refuses unknown keys; subclasses are the configs of patches, adapters and serving."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides):
        """Load ``path``; keyword ``overrides`` that are not None replace the file's values."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validate_dict(data, where=str(path))

    @classmethod
    def validate_dict(cls, data: dict, where: str = "config"):
        """Validate ``data``; UnlearnConfigError naming ``where`` (a file, "command line") when it does not fit."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UnlearnConfigError(f"invalid {cls.__name__} in {where}:\n{exc}") from exc
