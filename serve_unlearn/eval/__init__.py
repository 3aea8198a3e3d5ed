"""Evaluation: one harness over local models, O3 registries and live endpoints, reports, baselines, and the
verification record of a forget request. ``qa`` keeps the keyword-scored QA accuracy the benchmarks share."""

from .qa import chat_prompt, is_correct, load_qa, qa_accuracy

__all__ = ["chat_prompt", "is_correct", "load_qa", "qa_accuracy"]
