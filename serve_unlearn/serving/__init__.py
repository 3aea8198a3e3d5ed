"""Serving integrations (vLLM plugin and loader). Nothing here is imported by the offline code."""
