"""The YOLOv5-style toolbox (torch_utils.py) and small helpers. Imports nothing above harness.utils."""
