"""Scoring pretrained models on tasks: language modelling and zero-shot classification, QA, passkey, retrieval."""

__all__ = ["lm", "zeroshot"]
