"""Layers shared by the segmentation models.

Every layer here works with dynamic height and width, exports to a SavedModel
and converts to TFLite with builtin ops only (RESIZE_BILINEAR, STRIDED_SLICE,
SUB/MUL), which `keras.layers.UpSampling2D(interpolation="bilinear")` and
`keras.ops.image.resize` do not when H and W are unknown.
"""

from collections.abc import Sequence

import keras
import tensorflow as tf

# The batch norm of the original's arg_scope (decay 0.9, epsilon 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="uda_tf")
class PixelNormalization(keras.layers.Layer):
    """Maps raw RGB pixel values to (x - mean) / std, per channel.

    Input: [N, H, W, C] pixels in [0, 255], any real or integer dtype (uint8 is
    cast). Output: [N, H, W, C] in the layer's compute dtype. The mean colour
    maps to 0, so a mean-coloured fill is a zero input to the network.

    Args:
      mean: per-channel mean, length C.
      std: per-channel standard deviation, length C, all > 0.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        # No autocast: the pixels are normalised in float32, then cast.
        super().__init__(autocast=False, **kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(
                f"PixelNormalization needs equal-length mean and positive std, got "
                f"mean={self.mean}, std={self.std}."
            )

    def call(self, inputs):
        x = tf.cast(inputs, tf.float32)
        x = (x - tf.constant(self.mean, tf.float32)) * tf.constant(
            [1.0 / s for s in self.std], tf.float32
        )
        return tf.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std)})
        return config


@keras.saving.register_keras_serializable(package="uda_tf")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of a feature map to the height and width of another.

    Called as `layer([x, reference])` with x [N, h, w, C] and reference
    [N, H, W, *]; returns [N, H, W, C] in the compute dtype. The target size
    is read from the reference's dynamic shape, so that H and W may be
    unknown until run time (TF2 `tf.image.resize`, half-pixel centres).
    """

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)[1:3]
        y = tf.image.resize(x, size, method=tf.image.ResizeMethod.BILINEAR)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="uda_tf")
class CropLike(keras.layers.Layer):
    """Crops a feature map to the height and width of another, top-left aligned.

    Called as `layer([x, reference])` with x [N, h, w, C], h >= H, w >= W,
    and reference [N, H, W, *]; returns x[:, :H, :W, :] ([N, H, W, C]).
    """

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)
        return x[:, : size[1], : size[2], :]

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


def batch_norm(
    name: str,
    *,
    synchronized: bool = False,
    epsilon: float = BN_EPSILON,
    momentum: float = BN_MOMENTUM,
) -> keras.layers.BatchNormalization:
    """A BatchNormalization layer with the project's defaults.

    Args:
      name: layer name (snake_case, no '/').
      synchronized: average batch statistics across replicas (TF only).
      epsilon: variance epsilon; 1e-5 unless a backbone's ImageNet weights
        were trained with another one.
      momentum: moving-average momentum (0.9 keeps 90% of the old value).

    Returns:
      The layer.
    """
    return keras.layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, synchronized=synchronized, name=name
    )


def conv_bn_relu(
    x,
    filters: int,
    kernel_size: int,
    name: str,
    *,
    dilation_rate: int = 1,
    synchronized: bool = False,
):
    """Conv (no bias, 'same' padding) -> BN -> ReLU, layers named name{,_bn,_relu}.

    Args:
      x: KerasTensor [N, H, W, C].
      filters: output channels.
      kernel_size: square kernel size.
      name: prefix of the three layer names.
      dilation_rate: atrous rate of the conv.
      synchronized: synchronized batch norm.

    Returns:
      KerasTensor [N, H, W, filters].
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        name=name,
    )(x)
    x = batch_norm(f"{name}_bn", synchronized=synchronized)(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


class DilationSchedule:
    """Turns strides into atrous rates once the output stride is reached.

    As DeepLab's `stack_blocks_dense` (and torchvision's
    `replace_stride_with_dilation`): a unit that would stride past the output
    stride runs with stride 1 and the current rate; every later unit uses the
    rate multiplied by the stride it skipped.

    Args:
      output_stride: the largest total stride allowed (8, 16 or 32).
    """

    def __init__(self, output_stride: int):
        self.output_stride = output_stride
        self.current_stride = 1
        self.rate = 1

    def step(self, stride: int) -> tuple[int, int]:
        """Returns (stride, rate) for the next unit with nominal `stride`."""
        if stride > 1 and self.current_stride * stride > self.output_stride:
            rate = self.rate
            self.rate *= stride
            return 1, rate
        self.current_stride *= stride
        return stride, self.rate


def scaled(filters: int, width: float, minimum: int = 1) -> int:
    """Rounds filters * width to an int, at least `minimum`."""
    return max(minimum, round(filters * width))
