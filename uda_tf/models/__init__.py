"""Segmentation models: DeepLabv3+ and U-Net.

Contract of every model built here:
  input:  "image", [N, H, W, 3] raw RGB pixel values in [0, 255], float32
          (uint8 is accepted and cast). H and W are free (Input shape
          (None, None, 3)).
  output: float32 logits [N, H, W, num_classes] at the input resolution,
          also under `keras.mixed_precision.set_global_policy("mixed_float16")`
          (the logits conv and resize run in float32).
Normalisation happens inside the model, so that exported models (SavedModel,
TFLite) take raw pixels: U-Net computes (x - common.MEAN_RGB) / common.STD_RGB
(the mean colour that fills padded and warped-in pixels is 0 for the
network); DeepLabv3+ normalises as its backbone's ImageNet weights were
trained (backbones.INPUT_NORMALIZATION: x / 127.5 - 1 for the keras
MobileNets and Xception, that mean/std for ResNet and torchvision's
MobileNetV2), and records it in get_config.

Batch norm: momentum 0.9, epsilon 1e-5, `synchronized=synchronized_bn`.
Models save to .keras, round-trip through get_config/from_config, export to a
SavedModel and convert to TFLite with builtin ops only.
"""

import keras
from absl import logging

from uda_tf import config as config_lib
from uda_tf.models.backbone_weights import load_backbone_weights
from uda_tf.models.backbones import BACKBONES, build_backbone
from uda_tf.models.deeplabv3plus import DeepLabV3Plus
from uda_tf.models.unet import UNet

MODEL_NAMES = ("deeplabv3plus", "unet")

__all__ = [
    "BACKBONES",
    "MODEL_NAMES",
    "DeepLabV3Plus",
    "UNet",
    "build_backbone",
    "build_model",
    "build_model_from_config",
    "load_backbone_weights",
]


def build_model(
    model_name: str,
    num_classes: int,
    *,
    backbone: str = "resnet50",
    output_stride: int = 16,
    backbone_weights: str | None = None,
    unet_depth: int = 4,
    unet_filters: int = 64,
    synchronized_bn: bool = False,
    name: str | None = None,
    backbone_width: float = 1.0,
    decoder_filters: int = 256,
    input_normalization: str | None = None,
) -> keras.Model:
    """Builds a segmentation model (see the module docstring for its contract).

    Args:
      model_name: "deeplabv3plus" or "unet".
      num_classes: number of output channels.
      backbone: DeepLab backbone, one of BACKBONES.
      output_stride: DeepLab output stride, 8 or 16 (32: no dilation).
      backbone_weights: a local weights file for the DeepLab backbone (a
        keras.applications ImageNet .h5 file, or a .weights.h5 saved from
        `model.get_layer("backbone")`); None = random init. Never downloaded.
      unet_depth: U-Net downsamplings.
      unet_filters: U-Net channels of the first level.
      synchronized_bn: synchronized batch norm across replicas.
      name: model name (default: model_name).
      backbone_width: DeepLab backbone channel multiplier (1.0 = ImageNet; the
        MobileNets' alpha; a smaller one gives tiny test models).
      decoder_filters: DeepLab ASPP and decoder channels (DeepLab: 256).
      input_normalization: DeepLab input normalisation, "imagenet" or "tf";
        None = the backbone's (backbones.INPUT_NORMALIZATION).

    Returns:
      A keras.Model: [N, H, W, 3] pixels -> [N, H, W, num_classes] float32.

    Raises:
      ValueError: an unknown model or backbone name, a bad argument, or a
        backbone_weights file that does not fit (naming the layer).
    """
    if model_name == "deeplabv3plus":
        model = DeepLabV3Plus(
            num_classes,
            backbone=backbone,
            output_stride=output_stride,
            backbone_width=backbone_width,
            decoder_filters=decoder_filters,
            synchronized_bn=synchronized_bn,
            input_normalization=input_normalization,
            name=name,
        )
        if backbone_weights:
            load_backbone_weights(
                model.get_layer("backbone"),
                backbone_weights,
                input_normalization=model.input_normalization,
            )
        return model
    if model_name == "unet":
        if backbone_weights:
            logging.warning("U-Net has no pretrained backbone: ignoring %s.", backbone_weights)
        return UNet(
            num_classes,
            depth=unet_depth,
            filters=unet_filters,
            synchronized_bn=synchronized_bn,
            name=name,
        )
    raise ValueError(f"--model_name={model_name!r} is invalid: expected one of {MODEL_NAMES}.")


def build_model_from_config(cfg: config_lib.ModelConfig, **overrides) -> keras.Model:
    """Builds the model a ModelConfig describes.

    Args:
      cfg: the model part of the run's Config.
      **overrides: build_model keyword arguments that replace the config's
        (e.g. name, backbone_width).

    Returns:
      The keras.Model of `build_model`.
    """
    kwargs = {
        "backbone": cfg.backbone,
        "output_stride": cfg.output_stride,
        "backbone_weights": cfg.backbone_weights,
        "backbone_width": cfg.backbone_width,
        "decoder_filters": cfg.decoder_filters,
        "unet_depth": cfg.unet_depth,
        "unet_filters": cfg.unet_filters,
        "synchronized_bn": cfg.synchronized_bn,
    }
    kwargs.update(overrides)
    model_name = kwargs.pop("model_name", cfg.model_name)
    num_classes = kwargs.pop("num_classes", cfg.num_classes)
    return build_model(model_name, num_classes, **kwargs)
