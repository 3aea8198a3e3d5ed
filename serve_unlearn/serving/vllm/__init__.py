"""vLLM integration: the ``serve_unlearn`` load format (weight patches applied while the checkpoint streams in),
and O3 routing: ``--middleware serve_unlearn.serving.vllm.O3Middleware`` over a scaled adapter bank.

Import ``serve_unlearn.serving.vllm.loader`` only inside a process that has vLLM; ``plugin.register`` does that.
``O3Middleware`` resolves lazily, so the plugin (loaded in every vLLM process) does not import the gate.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "O3Middleware":
        from .middleware import O3Middleware

        return O3Middleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["O3Middleware"]
