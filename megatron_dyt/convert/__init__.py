"""Checkpoint interoperability: Hugging Face export/import and resharding to another layout."""
