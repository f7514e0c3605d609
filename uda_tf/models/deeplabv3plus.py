"""DeepLabv3+ (Chen et al., 2018): dilated backbone, ASPP, low-level decoder.

    image [N, H, W, 3] raw pixels
      -> PixelNormalization: the backbone's (backbones.INPUT_NORMALIZATION:
         x / 127.5 - 1 for the keras MobileNets and Xception, MEAN_RGB /
         STD_RGB for ResNet and torchvision), recorded in get_config
      -> backbone (nested model "backbone"): low_level (stride 4), high_level (stride OS)
      -> ASPP on high_level (decoder_filters channels, 256 as DeepLab): 1x1
         conv, three 3x3 atrous convs (rates 6/12/18 at OS 16, doubled at OS 8,
         halved at OS 32), image pooling (global mean, 1x1 conv, BN, ReLU,
         resized back); concat, 1x1 projection, dropout
      -> decoder: 48-channel 1x1 projection of low_level, ASPP output resized to
         it, concat, two 3x3 convs, 1x1 logits conv
      -> bilinear resize of the logits to H x W (float32)

Every conv before a BN has no bias; BN momentum 0.9 and epsilon 1e-5 in the
head (the backbone keeps its ImageNet epsilon, see backbones.py).
"""

import keras

from uda_tf.models import backbones
from uda_tf.models import layers as L

_BASE_RATES = (6, 12, 18)  # At output stride 16.


@keras.saving.register_keras_serializable(package="uda_tf")
class DeepLabV3Plus(keras.Model):
    """DeepLabv3+ as a functional model: image [N, H, W, 3] -> logits [N, H, W, K].

    The input is raw pixel values in [0, 255] (float32; uint8 is cast); the
    output is float32 logits at the input resolution, for any H and W, also
    under a mixed_float16 policy.

    Args:
      num_classes: K, the number of output channels.
      backbone: one of backbones.BACKBONES.
      output_stride: 8, 16 or 32, the stride of the ASPP input.
      backbone_width: channel multiplier of the backbone (1.0 = ImageNet; the
        MobileNets' alpha).
      decoder_filters: channels of the ASPP branches and of the decoder convs
        (DeepLab: 256).
      low_level_filters: channels of the low-level projection (48).
      dropout_rate: dropout after the ASPP projection (DeepLab's keep 0.9).
      synchronized_bn: synchronized batch norm across replicas.
      input_normalization: "imagenet" or "tf" (backbones.NORMALIZATIONS);
        None = the backbone's, backbones.INPUT_NORMALIZATION.
      name: model name.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        output_stride: int = 16,
        backbone_width: float = 1.0,
        decoder_filters: int = 256,
        low_level_filters: int = 48,
        dropout_rate: float = 0.1,
        synchronized_bn: bool = False,
        input_normalization: str | None = None,
        name: str | None = None,
        **kwargs,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} is invalid: expected >= 1.")
        if decoder_filters < 1:
            raise ValueError(f"--decoder_filters={decoder_filters!r} is invalid: expected >= 1.")
        if input_normalization is None:
            input_normalization = backbones.INPUT_NORMALIZATION.get(backbone, "imagenet")
        if input_normalization not in backbones.NORMALIZATIONS:
            raise ValueError(
                f"input_normalization={input_normalization!r} is invalid: expected one of "
                f"{tuple(backbones.NORMALIZATIONS)}."
            )
        sync = synchronized_bn
        image = keras.Input((None, None, 3), name="image")
        mean, std = backbones.NORMALIZATIONS[input_normalization]
        x = L.PixelNormalization(mean, std, name="normalization")(image)
        net = backbones.build_backbone(
            backbone, output_stride=output_stride, width=backbone_width, synchronized_bn=sync
        )
        low_level, high_level = net(x)
        rates = [r * 16 // output_stride for r in _BASE_RATES]
        x = _aspp(high_level, decoder_filters, rates, dropout_rate, sync)
        low = L.conv_bn_relu(
            low_level, low_level_filters, 1, "decoder_low_level", synchronized=sync
        )
        x = L.ResizeLike(name="decoder_upsample")([x, low])
        x = keras.layers.Concatenate(name="decoder_concat")([x, low])
        x = L.conv_bn_relu(x, decoder_filters, 3, "decoder_conv1", synchronized=sync)
        x = L.conv_bn_relu(x, decoder_filters, 3, "decoder_conv2", synchronized=sync)
        x = keras.layers.Conv2D(num_classes, 1, name="logits", dtype="float32")(x)
        logits = L.ResizeLike(name="logits_upsample", dtype="float32")([x, image])
        super().__init__(inputs=image, outputs=logits, name=name or "deeplabv3plus", **kwargs)
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.backbone_width = backbone_width
        self.decoder_filters = decoder_filters
        self.low_level_filters = low_level_filters
        self.dropout_rate = dropout_rate
        self.synchronized_bn = synchronized_bn
        self.input_normalization = input_normalization

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "output_stride": self.output_stride,
            "backbone_width": self.backbone_width,
            "decoder_filters": self.decoder_filters,
            "low_level_filters": self.low_level_filters,
            "dropout_rate": self.dropout_rate,
            "synchronized_bn": self.synchronized_bn,
            "input_normalization": self.input_normalization,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Saved before decoder_filters and input_normalization existed: every
        # backbone was fed (x - MEAN_RGB) / STD_RGB then.
        if "aspp_filters" in config:
            config["decoder_filters"] = config.pop("aspp_filters")
        config.setdefault("input_normalization", "imagenet")
        return cls(**config)


def _aspp(x, filters, rates, dropout_rate, sync):
    """Atrous spatial pyramid pooling: [N, h, w, C] -> [N, h, w, filters]."""
    branches = [L.conv_bn_relu(x, filters, 1, "aspp_conv0", synchronized=sync)]
    for i, rate in enumerate(rates, start=1):
        branches.append(
            L.conv_bn_relu(x, filters, 3, f"aspp_conv{i}", dilation_rate=rate, synchronized=sync)
        )
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = L.conv_bn_relu(pooled, filters, 1, "aspp_pool_conv", synchronized=sync)
    branches.append(L.ResizeLike(name="aspp_pool_upsample")([pooled, x]))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = L.conv_bn_relu(x, filters, 1, "aspp_project", synchronized=sync)
    return keras.layers.Dropout(dropout_rate, name="aspp_dropout")(x)


def feature_parts(network: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(features, head) of a DeepLabV3Plus, sharing its layers and weights.

    features: image -> [low_level, high_level], the backbone's outputs;
    head: [low_level, high_level, image] -> logits, the rest of the network
    (ASPP, decoder, resize to the image). head(features(x) + [x]) is
    network(x). For UniMatch's feature perturbation, which runs the head on
    features that lost channels (uda_tf.uda_model).

    Raises:
      TypeError: if `network` is not a built DeepLabV3Plus.
    """
    if not isinstance(network, DeepLabV3Plus):
        raise TypeError(
            f"feature_parts needs a DeepLabV3Plus network, got {type(network).__name__} "
            f"{network.name!r}."
        )
    low_level, high_level = network.get_layer("backbone")._inbound_nodes[0].output_tensors
    features = keras.Model(network.input, [low_level, high_level], name="fp_features")
    head = keras.Model([low_level, high_level, network.input], network.output, name="fp_head")
    return features, head
