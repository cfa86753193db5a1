"""Scoring pretrained models on tasks: language modelling, classification, QA, passkey, retrieval."""

__all__ = ["classification", "lm", "passkey", "qa", "retrieval", "scoring"]
