"""uda_tf: Unsupervised Data Augmentation for semantic segmentation."""

__version__ = "0.1.0"
