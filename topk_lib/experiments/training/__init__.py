"""Training with top-k: ListOps from scratch, MiniLM fine-tuning on SpamAssassin, and their tables."""

__all__ = ["loop", "listops", "finetune", "summaries"]
