"""Readers, downloader and CLI that turn google/automl EfficientDet TF checkpoints into PyTorch weights."""
