"""Dilated ImageNet backbones for DeepLabv3+: ResNet-50/101, MobileNet v1/v2, Xception.

Each backbone is a `keras.Model` named "backbone" that takes normalised images
[N, H, W, 3] (see `PixelNormalization` and `INPUT_NORMALIZATION`) and returns
two feature maps:
  low_level:  [N, ceil(H/4), ceil(W/4), C_low]   (the decoder's skip)
  high_level: [N, ceil(H/OS), ceil(W/OS), C_high] (the ASPP input)
where OS is the output stride (8, 16 or 32). As in the DeepLab papers, the
strides of the last stage(s) become atrous rates (`DilationSchedule`), so the
network keeps all its layers and weights at every output stride.

Layer names and weight shapes are those of `keras.applications` (ResNet50,
ResNet101, MobileNetV2 and MobileNet with `alpha`, Xception), lower-cased for
MobileNetV2 ("Conv1" -> "conv1", "block_1_expand_BN" -> "block_1_expand_bn"); Xception's
unnamed shortcut convs are called "blockN_shortcut" / "blockN_shortcut_bn".
Hence `backbone_weights.load_backbone_weights` can read the
keras.applications ImageNet files. Differences from keras.applications:
  - Xception is Keras's Xception (not DeepLab's aligned Xception-65), with
    dilation; its two stem convs and all stride-2 convs use 'same' padding, so
    that every stage is exactly ceil(H/stride); a pooling whose stride is
    replaced keeps its 3x3 window with stride 1.
  - MobileNetV2 stride-2 depthwise convs use 'same' padding (the same as
    keras's explicit pad for static sizes) and the network stops at block_16
    (320 channels), as DeepLab's, without the 1x1 Conv_1 to 1280 channels.
    "mobilenetv2_torchvision" is the same network with torchvision's
    symmetric padding: every stride-2 3x3 conv pads 1 pixel on each side
    (ZeroPadding2D "conv1_pad" / "block_N_pad", then 'valid'), where keras
    pads (0, 1) on even sizes; for the torchvision ImageNet weights.
  - MobileNet (v1) stride-2 depthwise convs use 'same' padding too, and the
    taps are conv_pw_3_relu (stride 4) and conv_pw_13_relu.
  - No multi-grid in ResNet's last stage.
BN epsilon is the one the ImageNet weights were trained with (1.001e-5 for
ResNet, 1e-3 for the MobileNets and Xception) and momentum is 0.9 everywhere.
"""

import keras

from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.models import layers as L

# The names --backbone takes (one list, in uda_tf/config.py).
BACKBONES = config_lib.BACKBONES
# Input normalisations, (mean, std) of raw RGB pixels in [0, 255]:
# "imagenet" = (x - MEAN_RGB) / STD_RGB; "tf" = x / 127.5 - 1 (keras
# preprocess_input mode 'tf').
NORMALIZATIONS = {
    "imagenet": (common.MEAN_RGB, common.STD_RGB),
    "tf": ((127.5,) * 3, (127.5,) * 3),
}
# Each backbone's input normalisation: the one its ImageNet weights were
# trained with, zero padding included (the first conv pads with 0, i.e. with
# the colour that normalises to 0). keras.applications' MobileNets and
# Xception: 'tf'. torchvision: ImageNet mean/std. ResNet ('caffe', BGR minus
# the mean, std 1): "imagenet", whose mean is caffe's to 0.5 levels; the
# loader folds the rest into the first conv (backbone_weights.py).
INPUT_NORMALIZATION = {
    "resnet50": "imagenet",
    "resnet101": "imagenet",
    "mobilenetv1": "tf",
    "mobilenetv2": "tf",
    "mobilenetv2_torchvision": "imagenet",
    "xception": "tf",
}
_RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
_RESNET_EPS = 1.001e-5
_IMAGENET_EPS = 1e-3


def build_backbone(
    name: str,
    *,
    output_stride: int = 16,
    width: float = 1.0,
    synchronized_bn: bool = False,
) -> keras.Model:
    """Builds a dilated backbone (random weights).

    Args:
      name: one of BACKBONES.
      output_stride: 8, 16 or 32 (32 = the ImageNet network, no dilation).
      width: channel multiplier; 1.0 is the ImageNet network. For the
        MobileNets it is keras's `alpha` (MobileNetV2 rounds channels to
        multiples of 8, MobileNet truncates them).
      synchronized_bn: synchronized batch norm across replicas.

    Returns:
      keras.Model "backbone": [N, H, W, 3] float -> [low_level, high_level].

    Raises:
      ValueError: unknown name, output stride or width.
    """
    if name not in BACKBONES:
        raise ValueError(f"--backbone={name!r} is invalid: expected one of {BACKBONES}.")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"--output_stride={output_stride!r} is invalid: expected 8, 16 or 32.")
    if not width > 0:
        raise ValueError(f"Backbone width={width!r} is invalid: expected > 0.")
    inputs = keras.Input((None, None, 3), name="backbone_input")
    schedule = L.DilationSchedule(output_stride)
    kwargs = {"width": width, "schedule": schedule, "sync": synchronized_bn}
    if name in _RESNET_BLOCKS:
        low, high = _resnet(inputs, _RESNET_BLOCKS[name], **kwargs)
    elif name in ("mobilenetv2", "mobilenetv2_torchvision"):
        low, high = _mobilenet_v2(inputs, symmetric_pad=name.endswith("torchvision"), **kwargs)
    elif name == "mobilenetv1":
        low, high = _mobilenet_v1(inputs, **kwargs)
    else:
        low, high = _xception(inputs, **kwargs)
    return keras.Model(inputs, [low, high], name="backbone")


def _bn(name, sync, eps):
    return L.batch_norm(name, synchronized=sync, epsilon=eps)


def _resnet(x, blocks, *, width, schedule, sync):
    """keras.applications ResNet v1 (stride on the first 1x1 conv of a stage)."""
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    stride, _ = schedule.step(2)
    x = keras.layers.Conv2D(L.scaled(64, width), 7, strides=stride, name="conv1_conv")(x)
    x = _bn("conv1_bn", sync, _RESNET_EPS)(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    stride, _ = schedule.step(2)
    x = keras.layers.MaxPooling2D(3, strides=stride, name="pool1_pool")(x)
    low = None
    for stage, (num_blocks, filters) in enumerate(zip(blocks, (64, 128, 256, 512))):
        stride, rate = schedule.step(1 if stage == 0 else 2)
        for i in range(num_blocks):
            x = _resnet_block(
                x,
                L.scaled(filters, width),
                stride=stride if i == 0 else 1,
                rate=rate if i == 0 else schedule.rate,
                shortcut_conv=i == 0,
                name=f"conv{stage + 2}_block{i + 1}",
                sync=sync,
            )
        if stage == 0:
            low = x
    return low, x


def _resnet_block(x, filters, *, stride, rate, shortcut_conv, name, sync):
    if shortcut_conv:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _bn(f"{name}_0_bn", sync, _RESNET_EPS)(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = _bn(f"{name}_1_bn", sync, _RESNET_EPS)(x)
    x = keras.layers.ReLU(name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", dilation_rate=rate, name=f"{name}_2_conv")(
        x
    )
    x = _bn(f"{name}_2_bn", sync, _RESNET_EPS)(x)
    x = keras.layers.ReLU(name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = _bn(f"{name}_3_bn", sync, _RESNET_EPS)(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# (filters, stride, expansion) of blocks 0..16, as keras.applications.MobileNetV2.
_MOBILENET_V2_BLOCKS = (
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
)


def _pad_for(x, rate, *, symmetric, name):
    """Padding of a 3x3 conv with nominal stride 2: 'same', or torchvision's.

    Returns (x, padding). torchvision pads `rate` pixels on each side, then
    runs a 'valid' conv: with stride 1 (a dilated unit) that is 'same'; with
    stride 2 (always rate 1) it pads 1 pixel where 'same' pads (0, 1) on even
    sizes.
    """
    if not symmetric:
        return x, "same"
    return keras.layers.ZeroPadding2D(rate, name=name)(x), "valid"


def _mobilenet_v2(x, *, width, schedule, sync, symmetric_pad=False):
    """keras.applications MobileNetV2 (alpha = width) up to block_16."""
    stride, rate = schedule.step(2)
    x, padding = _pad_for(x, rate, symmetric=symmetric_pad, name="conv1_pad")
    x = keras.layers.Conv2D(
        _make_divisible(32 * width),
        3,
        strides=stride,
        padding=padding,
        use_bias=False,
        name="conv1",
    )(x)
    x = _bn("bn_conv1", sync, _IMAGENET_EPS)(x)
    x = keras.layers.ReLU(6.0, name="conv1_relu")(x)
    low = None
    for block_id, (filters, nominal_stride, expansion) in enumerate(_MOBILENET_V2_BLOCKS):
        stride, rate = schedule.step(nominal_stride)
        x, depthwise = _inverted_res_block(
            x,
            _make_divisible(int(filters * width)),
            stride=stride,
            rate=rate,
            nominal_stride=nominal_stride,
            expansion=expansion,
            block_id=block_id,
            sync=sync,
            symmetric_pad=symmetric_pad,
        )
        if block_id == 2:
            # DeepLab's 'layer_4/depthwise_output': stride 4, 144 channels at width 1.
            low = depthwise
    return low, x


def _inverted_res_block(
    inputs, filters, *, stride, rate, nominal_stride, expansion, block_id, sync, symmetric_pad
):
    in_channels = inputs.shape[-1]
    x = inputs
    if block_id:
        prefix = f"block_{block_id}_"
        x = keras.layers.Conv2D(
            expansion * in_channels, 1, padding="same", use_bias=False, name=f"{prefix}expand"
        )(x)
        x = _bn(f"{prefix}expand_bn", sync, _IMAGENET_EPS)(x)
        x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    else:
        prefix = "expanded_conv_"
    symmetric = symmetric_pad and nominal_stride == 2
    x, padding = _pad_for(x, rate, symmetric=symmetric, name=f"{prefix}pad")
    x = keras.layers.DepthwiseConv2D(
        3,
        strides=stride,
        padding=padding,
        dilation_rate=rate,
        use_bias=False,
        name=f"{prefix}depthwise",
    )(x)
    x = _bn(f"{prefix}depthwise_bn", sync, _IMAGENET_EPS)(x)
    depthwise = x = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{prefix}project")(x)
    x = _bn(f"{prefix}project_bn", sync, _IMAGENET_EPS)(x)
    # The residual depends on the nominal stride, so that every output stride
    # has the same layers.
    if in_channels == filters and nominal_stride == 1:
        x = keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x, depthwise


# (pointwise filters, stride) of MobileNet's depthwise blocks 1..13.
_MOBILENET_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


def _mobilenet_v1(x, *, width, schedule, sync):
    """keras.applications MobileNet (alpha = width, depth_multiplier 1)."""

    def w(f):
        return max(1, int(f * width))

    stride, _ = schedule.step(2)
    conv1 = keras.layers.Conv2D(
        w(32), 3, strides=stride, padding="same", use_bias=False, name="conv1"
    )
    x = conv1(x)
    x = _bn("conv1_bn", sync, _IMAGENET_EPS)(x)
    x = keras.layers.ReLU(6.0, name="conv1_relu")(x)
    low = None
    for block_id, (filters, nominal_stride) in enumerate(_MOBILENET_V1_BLOCKS, start=1):
        stride, rate = schedule.step(nominal_stride)
        x = keras.layers.DepthwiseConv2D(
            3,
            strides=stride,
            padding="same",
            dilation_rate=rate,
            use_bias=False,
            name=f"conv_dw_{block_id}",
        )(x)
        x = _bn(f"conv_dw_{block_id}_bn", sync, _IMAGENET_EPS)(x)
        x = keras.layers.ReLU(6.0, name=f"conv_dw_{block_id}_relu")(x)
        x = keras.layers.Conv2D(
            w(filters), 1, padding="same", use_bias=False, name=f"conv_pw_{block_id}"
        )(x)
        x = _bn(f"conv_pw_{block_id}_bn", sync, _IMAGENET_EPS)(x)
        x = keras.layers.ReLU(6.0, name=f"conv_pw_{block_id}_relu")(x)
        if block_id == 3:
            low = x  # conv_pw_3_relu: stride 4, 128 * alpha channels.
    return low, x


def _sepconv(x, filters, name, *, rate, sync, relu_before):
    if relu_before:
        x = keras.layers.ReLU(name=f"{name}_act")(x)
    x = keras.layers.SeparableConv2D(
        filters, 3, padding="same", dilation_rate=rate, use_bias=False, name=name
    )(x)
    return _bn(f"{name}_bn", sync, _IMAGENET_EPS)(x)


def _xception_entry_block(x, filters, block, *, schedule, sync, first):
    """Blocks 2, 3, 4 and 13: two sepconvs, a pool, a strided 1x1 shortcut."""
    stride, rate = schedule.step(2)
    name = f"block{block}"
    shortcut = keras.layers.Conv2D(
        filters[1], 1, strides=stride, padding="same", use_bias=False, name=f"{name}_shortcut"
    )(x)
    shortcut = _bn(f"{name}_shortcut_bn", sync, _IMAGENET_EPS)(shortcut)
    x = _sepconv(x, filters[0], f"{name}_sepconv1", rate=rate, sync=sync, relu_before=not first)
    if first:
        x = keras.layers.ReLU(name=f"{name}_sepconv2_act")(x)
    x = _sepconv(x, filters[1], f"{name}_sepconv2", rate=rate, sync=sync, relu_before=not first)
    pre_pool = x
    x = keras.layers.MaxPooling2D(3, strides=stride, padding="same", name=f"{name}_pool")(x)
    return keras.layers.Add(name=f"{name}_add")([x, shortcut]), pre_pool


def _xception(x, *, width, schedule, sync):
    """keras.applications Xception with dilation."""

    def w(f):
        return L.scaled(f, width)

    stride, _ = schedule.step(2)
    x = keras.layers.Conv2D(
        w(32), 3, strides=stride, padding="same", use_bias=False, name="block1_conv1"
    )(x)
    x = _bn("block1_conv1_bn", sync, _IMAGENET_EPS)(x)
    x = keras.layers.ReLU(name="block1_conv1_act")(x)
    x = keras.layers.Conv2D(w(64), 3, padding="same", use_bias=False, name="block1_conv2")(x)
    x = _bn("block1_conv2_bn", sync, _IMAGENET_EPS)(x)
    x = keras.layers.ReLU(name="block1_conv2_act")(x)
    common = {"schedule": schedule, "sync": sync}
    x, _ = _xception_entry_block(x, (w(128), w(128)), 2, first=True, **common)
    x, low = _xception_entry_block(x, (w(256), w(256)), 3, first=False, **common)
    x, _ = _xception_entry_block(x, (w(728), w(728)), 4, first=False, **common)
    for block in range(5, 13):
        shortcut = x
        for i in (1, 2, 3):
            name = f"block{block}_sepconv{i}"
            x = _sepconv(x, w(728), name, rate=schedule.rate, sync=sync, relu_before=True)
        x = keras.layers.Add(name=f"block{block}_add")([x, shortcut])
    x, _ = _xception_entry_block(x, (w(728), w(1024)), 13, first=False, **common)
    for i, filters in ((1, 1536), (2, 2048)):
        name = f"block14_sepconv{i}"
        x = _sepconv(x, w(filters), name, rate=schedule.rate, sync=sync, relu_before=False)
        x = keras.layers.ReLU(name=f"{name}_act")(x)
    return low, x
