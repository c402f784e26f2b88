"""Evaluation: zero-shot classification, image-text retrieval (metrics on embeddings, and the
distributed embedding passes that feed them)."""
