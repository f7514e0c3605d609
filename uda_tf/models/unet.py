"""U-Net (Ronneberger et al., 2015) with batch norm and 'same' convs.

    image [N, H, W, 3] raw pixels -> PixelNormalization (MEAN_RGB / STD_RGB)
    encoder level i = 0..depth: (3x3 conv, BN, ReLU) x 2 with filters * 2^i
                                channels, then a 2x2 max pool ('same', so a
                                level is ceil(H / 2^i) high) below the last
    decoder level i = depth-1..0: 2x2 stride-2 transposed conv to filters * 2^i
                                channels, cropped to the skip's size, concat
                                [skip, up], (3x3 conv, BN, ReLU) x 2
    1x1 conv -> float32 logits [N, H, W, K]

Any H and W work: the pools round up and the crops undo the excess, so the
output is exactly the input size. depth 4 and filters 64 is the paper's
network (31.0M parameters, as the usual PyTorch port with transposed convs).
"""

import keras

from uda_tf import common
from uda_tf.models import layers as L


@keras.saving.register_keras_serializable(package="uda_tf")
class UNet(keras.Model):
    """U-Net as a functional model: image [N, H, W, 3] -> logits [N, H, W, K].

    The input is raw pixel values in [0, 255] (float32; uint8 is cast); the
    output is float32 logits at the input resolution, also under a
    mixed_float16 policy.

    Args:
      num_classes: K, the number of output channels.
      depth: number of 2x downsamplings (>= 1).
      filters: channels of the first level (doubled at each level below).
      synchronized_bn: synchronized batch norm across replicas.
      name: model name.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 4,
        filters: int = 64,
        synchronized_bn: bool = False,
        name: str | None = None,
        **kwargs,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} is invalid: expected >= 1.")
        if depth < 1:
            raise ValueError(f"--unet_depth={depth!r} is invalid: expected >= 1.")
        if filters < 1:
            raise ValueError(f"--unet_filters={filters!r} is invalid: expected >= 1.")
        sync = synchronized_bn
        image = keras.Input((None, None, 3), name="image")
        x = L.PixelNormalization(common.MEAN_RGB, common.STD_RGB, name="normalization")(image)
        skips = []
        for level in range(depth + 1):
            if level:
                x = keras.layers.MaxPooling2D(2, padding="same", name=f"enc{level}_pool")(x)
            x = _double_conv(x, filters * 2**level, f"enc{level}", sync)
            skips.append(x)
        for level in reversed(range(depth)):
            skip = skips[level]
            x = keras.layers.Conv2DTranspose(
                filters * 2**level, 2, strides=2, name=f"dec{level}_up"
            )(x)
            x = L.CropLike(name=f"dec{level}_crop")([x, skip])
            x = keras.layers.Concatenate(name=f"dec{level}_concat")([skip, x])
            x = _double_conv(x, filters * 2**level, f"dec{level}", sync)
        logits = keras.layers.Conv2D(num_classes, 1, name="logits", dtype="float32")(x)
        super().__init__(inputs=image, outputs=logits, name=name or "unet", **kwargs)
        self.num_classes = num_classes
        self.depth = depth
        self.filters = filters
        self.synchronized_bn = synchronized_bn

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "depth": self.depth,
            "filters": self.filters,
            "synchronized_bn": self.synchronized_bn,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _double_conv(x, filters, name, sync):
    x = L.conv_bn_relu(x, filters, 3, f"{name}_conv1", synchronized=sync)
    return L.conv_bn_relu(x, filters, 3, f"{name}_conv2", synchronized=sync)
