"""Installs uda_tf: UDA consistency training for semantic segmentation."""

import pathlib

import setuptools

setuptools.setup(
    name="uda_tf",
    version="0.1.0",
    description=(
        "Unsupervised Data Augmentation (UDA) for semantic segmentation in TensorFlow 2 / Keras 3"
    ),
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(
        include=["uda_tf", "uda_tf.*", "augment", "augment.*", "flags", "flags.*"]
    ),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10,<5",
        # tfds 4.9.10's cityscapes builder imports it but does not declare it.
        "importlib_resources>=6",
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "cityscapesscripts>=2.2,<3",
            "ai-edge-litert>=2.0,<3",
            "ruff>=0.6",
        ],
        "export": ["ai-edge-litert>=2.0,<3"],
    },
)
