"""Datasets, augmentation and masking for self-supervised training."""
