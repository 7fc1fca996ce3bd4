"""Verification tools: numerical parity with automl and COCO mAP evaluation."""
