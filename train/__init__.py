"""Fine-tuning EfficientDet the way automl trains it (``train`` command)."""
