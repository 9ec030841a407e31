"""Sampling: turning logits into tokens."""
