"""Segmentation models: DeepLabv3+ and U-Net."""
