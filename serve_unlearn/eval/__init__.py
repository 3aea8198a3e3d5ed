"""Evaluation helpers: QA accuracy with one scoring rule shared by transformers and vLLM runs."""

from .qa import chat_prompt, is_correct, load_qa, qa_accuracy

__all__ = ["chat_prompt", "is_correct", "load_qa", "qa_accuracy"]
