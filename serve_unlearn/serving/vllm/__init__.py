"""vLLM integration: the ``serve_unlearn`` load format (weight patches applied while the checkpoint streams in).

Import ``serve_unlearn.serving.vllm.loader`` only inside a process that has vLLM; ``plugin.register`` does that.
"""
