"""Training with top-k: ListOps from scratch and MiniLM fine-tuning."""

__all__ = ["train"]
