"""Runnable examples for mergekit-fisher-mask (assets, fine-tuning, merging)."""
