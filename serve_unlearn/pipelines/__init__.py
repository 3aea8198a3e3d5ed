"""diffusers pipelines. Imported lazily, so ``serve_unlearn`` (and its CLI) works without diffusers installed.

    from serve_unlearn.pipelines import StableDiffusionAttentiveEraserPipeline

The public names are those of ``serve_unlearn.pipelines.attentive_eraser`` (its ``__all__``).
"""

from __future__ import annotations

import importlib
import importlib.util


def __getattr__(name: str):
    if name.startswith("__"):  # module protocol probes (__path__, __wrapped__, ...) are not pipeline names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError(f"serve_unlearn.pipelines.{name} needs diffusers: pip install 'serve-unlearn[diffusers]'")
    eraser = importlib.import_module(".attentive_eraser", __name__)
    if name not in eraser.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(eraser, name)
