"""One geometric transform applied jointly to an image and its mask.

Transforms follow `tf.raw_ops.ImageProjectiveTransformV3`: an 8-vector
[a0, a1, a2, b0, b1, b2, c0, c1] maps an OUTPUT pixel (x, y) (integer pixel
centres, x = column, y = row) to the INPUT point
((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1.
As 3x3 matrices they compose by product: if a first warp uses M1 and a second
one M2, the result is one warp by M1 @ M2 (`compose_transforms(t1, t2)`).

The image is filled with a colour (the mean colour by default, i.e. 0 after
normalisation) and the mask with the ignore label, so out-of-frame pixels are
marked invalid. The mask is always warped with nearest interpolation and keeps
its dtype and shape ([H, W] or [H, W, 1]).
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from uda_tf import common

IDENTITY_TRANSFORM = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
INTERPOLATIONS = ("bilinear", "nearest")
# Dtypes ImageProjectiveTransformV3 accepts; other integer masks go via int32.
_WARP_DTYPES = (tf.uint8, tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64)


def identity_transform() -> tf.Tensor:
    """The identity transform, float32 [8]."""
    return tf.constant(IDENTITY_TRANSFORM, tf.float32)


def transform_to_matrix(transform: tf.Tensor) -> tf.Tensor:
    """float32 [..., 8] transform -> float32 [..., 3, 3] matrix."""
    transform = tf.convert_to_tensor(transform, tf.float32)
    ones = tf.ones_like(transform[..., :1])
    flat = tf.concat([transform, ones], axis=-1)
    return tf.reshape(flat, tf.concat([tf.shape(transform)[:-1], [3, 3]], axis=0))


def matrix_to_transform(matrix: tf.Tensor) -> tf.Tensor:
    """float32 [..., 3, 3] matrix -> float32 [..., 8] transform (scaled so m[2, 2] = 1)."""
    matrix = tf.convert_to_tensor(matrix, tf.float32)
    flat = tf.reshape(matrix, tf.concat([tf.shape(matrix)[:-2], [9]], axis=0))
    return flat[..., :8] / flat[..., 8:]


def compose_transforms(*transforms: tf.Tensor) -> tf.Tensor:
    """The one transform equal to warping by `transforms[0]`, then `[1]`, ...

    Args:
      *transforms: float32 [8] (or [B, 8]) transforms, in the order the warps
        are applied.

    Returns:
      float32 [8] (or [B, 8]): the product of their matrices, in that order.
    """
    matrix = transform_to_matrix(transforms[0])
    for t in transforms[1:]:
        matrix = tf.linalg.matmul(matrix, transform_to_matrix(t))
    return matrix_to_transform(matrix)


def check_interpolation(interpolation: str) -> None:
    """Raises ValueError unless `interpolation` is 'bilinear' or 'nearest'."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {INTERPOLATIONS}.")


def warp_tensor(
    x: tf.Tensor,
    transform: tf.Tensor,
    *,
    interpolation: str = "nearest",
    fill_value: float = 0.0,
) -> tf.Tensor:
    """Warps one [H, W, C] or a batch [B, H, W, C] of tensors, same-size output.

    Args:
      x: [H, W, C] or [B, H, W, C], any dtype the op takes (uint8, int32,
        int64, float16, bfloat16, float32, float64).
      transform: float32 [8] (one for all) or [B, 8], output -> input.
      interpolation: "nearest" or "bilinear".
      fill_value: the value of output pixels whose source is outside `x`.

    Returns:
      Same shape and dtype as `x`.
    """
    check_interpolation(interpolation)
    transform = tf.convert_to_tensor(transform, tf.float32)
    batched = x.shape.rank == 4
    images = x if batched else x[tf.newaxis]
    if transform.shape.rank == 1:
        transform = transform[tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transform,
        output_shape=tf.shape(images)[1:3],
        fill_value=tf.constant(fill_value, tf.float32),
        interpolation=interpolation.upper(),
        fill_mode="CONSTANT",
    )
    return out if batched else out[0]


def warp_mask(
    mask: tf.Tensor, transform: tf.Tensor, *, fill: int = common.IGNORE_LABEL
) -> tf.Tensor:
    """Nearest-neighbour warp of a label mask, out-of-frame pixels = `fill`.

    Args:
      mask: integer [H, W] or [H, W, 1].
      transform: float32 [8], output -> input.
      fill: label of out-of-frame pixels (the ignore label).

    Returns:
      The warped mask, same shape and dtype as `mask`.
    """
    dtype = mask.dtype
    x = mask if dtype in _WARP_DTYPES else tf.cast(mask, tf.int32)
    x3 = x[..., tf.newaxis] if mask.shape.rank == 2 else x
    out = warp_tensor(x3, transform, interpolation="nearest", fill_value=float(fill))
    if mask.shape.rank == 2:
        out = out[..., 0]
    return tf.cast(out, dtype) if out.dtype != dtype else out


def _per_channel(x: tf.Tensor, values: tf.Tensor, op) -> tf.Tensor:
    """op(x, values) with x [H, W, C] and values [C], as a row broadcast.

    Broadcasting a [C] vector over [H, W, C] takes a slow generic path in
    TensorFlow; [H, W * C] against a tiled [W * C] row is several times faster.
    """
    shape = tf.shape(x)
    values = tf.cast(values, x.dtype)
    flat = tf.reshape(x, tf.stack([shape[0], shape[1] * shape[2]]))
    return tf.reshape(op(flat, tf.tile(values, shape[1:2])), shape)


def add_per_channel(x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """x + values, x [H, W, C], values [C] (same dtype after a cast). uint8 wraps."""
    return _per_channel(x, values, tf.add)


def mul_per_channel(x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """x * values, x [H, W, C], values [C] (same dtype after a cast)."""
    return _per_channel(x, values, tf.multiply)


def _integer_shift(transform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(is a translation by whole pixels, dx, dy): input = output + (dx, dy)."""
    linear = tf.gather(transform, [0, 1, 3, 4, 6, 7])
    offsets = tf.gather(transform, [2, 5])
    whole = tf.logical_and(
        tf.reduce_all(tf.equal(linear, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0])),
        tf.reduce_all(tf.equal(offsets, tf.round(offsets))),
    )
    limit = 2.0**30  # keeps the int32 cast defined; clipped to the size later.
    dxy = tf.cast(tf.clip_by_value(offsets, -limit, limit), tf.int32)
    return whole, dxy[0], dxy[1]


def _shift(image, mask, dx, dy, fill, mask_fill):
    """Whole-pixel translation (exactly what the warp computes for one), no resampling."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    dx = tf.clip_by_value(dx, -width, width)
    dy = tf.clip_by_value(dy, -height, height)
    rows = slice(tf.maximum(dy, 0), height + tf.minimum(dy, 0))
    cols = slice(tf.maximum(dx, 0), width + tf.minimum(dx, 0))
    pads = [
        [tf.maximum(-dy, 0), tf.maximum(dy, 0)],
        [tf.maximum(-dx, 0), tf.maximum(dx, 0)],
    ]
    # uint8 arithmetic wraps: (crop - fill) padded with 0, + fill.
    fill = tf.constant(fill, tf.uint8)
    crop = add_per_channel(image[rows, cols], tf.constant(0, tf.uint8) - fill)
    image = add_per_channel(tf.pad(crop, pads + [[0, 0]]), fill)
    if mask is not None:
        extra = [[0, 0]] * (mask.shape.rank - 2)
        mask = tf.pad(
            mask[rows, cols], pads + extra, constant_values=tf.cast(mask_fill, mask.dtype)
        )
    return image, mask


def _packed_fill(fill: Sequence[float], mask_fill: int) -> float | None:
    """The int32 of bytes (R, G, B, mask_fill) as a float, if float32 holds it exactly."""
    if len(fill) != 3 or not 0 <= mask_fill <= 255:
        return None
    value = int(np.array([*fill, mask_fill], np.uint8).view(np.int32)[0])
    return float(value) if abs(value) <= 2**24 else None


def _warp_nearest_packed(image, mask, transform, packed_fill):
    """Nearest warp of RGB and a uint8 mask in one single-channel int32 warp."""
    if mask is None:
        rgbm = tf.pad(image, [[0, 0], [0, 0], [0, 1]], constant_values=255)
    else:
        rgbm = tf.concat([image, tf.reshape(mask, tf.shape(image)[:2])[..., tf.newaxis]], -1)
    packed = tf.bitcast(rgbm, tf.int32)[..., tf.newaxis]
    out = warp_tensor(packed, transform, interpolation="nearest", fill_value=packed_fill)
    out = tf.bitcast(out[..., 0], tf.uint8)  # [H, W, 4]
    if mask is not None:
        mask = tf.reshape(out[..., 3], tf.shape(mask))
    return out[..., :3], mask


def _warp(image, mask, transform, interpolation, fill, mask_fill):
    """The general path: ImageProjectiveTransformV3."""
    packed_fill = _packed_fill(fill, mask_fill)
    if (
        interpolation == "nearest"
        and packed_fill is not None
        and (mask is None or mask.dtype == tf.uint8)
    ):
        return _warp_nearest_packed(image, mask, transform, packed_fill)
    if interpolation == "nearest":
        ones = tf.ones_like(image[..., :1])
        x = warp_tensor(tf.concat([image, ones], -1), transform, interpolation="nearest")
        valid = tf.cast(x[..., -1:], tf.uint8)
        fill_img = add_per_channel(tf.zeros_like(image), tf.constant(fill, tf.float32))
        image = x[..., :-1] * valid + fill_img * (1 - valid)
    else:
        # Bilinear: warp image - fill with fill 0, then + fill (weights sum to 1).
        fill_f = tf.constant(fill, tf.float32)
        x = add_per_channel(tf.cast(image, tf.float32), -fill_f)
        x = warp_tensor(x, transform, interpolation="bilinear", fill_value=0.0)
        # Values are >= 0: truncation after + 0.5 rounds half up.
        image = tf.cast(add_per_channel(x, fill_f + 0.5), tf.uint8)
    if mask is not None:
        mask = warp_mask(mask, transform, fill=mask_fill)
    return image, mask


def warp_image(
    image: tf.Tensor,
    transform: tf.Tensor,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[float] | None = None,
) -> tf.Tensor:
    """Warps a uint8 [H, W, C] image, filling with a per-channel colour.

    Args:
      image: uint8 [H, W, C].
      transform: float32 [8], output -> input.
      interpolation: "bilinear" or "nearest".
      fill: C values in [0, 255]; default `common.MEAN_RGB_UINT8`.

    Returns:
      uint8 [H, W, C]; see `warp_image_and_mask`.
    """
    return warp_image_and_mask(image, None, transform, interpolation=interpolation, fill=fill)[0]


def warp_image_and_mask(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    transform: tf.Tensor,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[float] | None = None,
    mask_fill: int = common.IGNORE_LABEL,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Applies one transform to an image and (if given) its mask.

    The result equals ImageProjectiveTransformV3 with a per-channel constant
    fill: bilinear warps image - fill with fill 0 in float32, adds the fill
    back and rounds; nearest warps RGB and a uint8 mask packed in one int32.
    A translation by whole pixels (TranslateX/Y) is done by slicing and
    padding, which gives the same pixels without resampling work.

    Args:
      image: uint8 [H, W, C].
      mask: integer [H, W] or [H, W, 1], or None.
      transform: float32 [8], output -> input.
      interpolation: of the image ("bilinear" or "nearest"); the mask is
        always nearest.
      fill: image fill colour, C values; default `common.MEAN_RGB_UINT8`.
      mask_fill: mask fill label (the ignore label).

    Returns:
      (image, mask): the warped pair, shapes and dtypes kept; mask None if
      none was given.
    """
    check_interpolation(interpolation)
    fill = tuple(common.MEAN_RGB_UINT8 if fill is None else fill)
    transform = tf.convert_to_tensor(transform, tf.float32)
    whole, dx, dy = _integer_shift(transform)

    def _fast():
        return _shift(image, mask, dx, dy, fill, mask_fill)

    def _slow():
        return _warp(image, mask, transform, interpolation, fill, mask_fill)

    if mask is None:
        return tf.cond(whole, lambda: _fast()[0], lambda: _slow()[0]), None
    return tf.cond(whole, _fast, _slow)
