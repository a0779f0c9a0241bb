"""Triton client for thighseg models: slice batches in, logits out; whole-volume segmentation."""
