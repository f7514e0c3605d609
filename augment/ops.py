"""The 15 RandAugment ops of UDA as pure functions: explicit parameters, no RNG.

Images are uint8 [H, W, 3]. Photometric ops return the image only and follow
Pillow's definitions (PIL.ImageOps.invert/posterize/solarize/equalize/
autocontrast, PIL.ImageEnhance.Color/Contrast/Brightness/Sharpness), which the
original UDA called. Geometric ops take a mask too ([H, W] or [H, W, 1], any
integer dtype, or None) and return (image, mask, transform): the image is
resampled bilinearly (or nearest) and filled with the mean colour, the mask by
nearest and filled with the ignore label, and `transform` is the float32 [8]
`ImageProjectiveTransformV3` vector (output -> input) that was applied.

Geometry is Pillow's: its transforms act on continuous coordinates whose
pixel centres are at +0.5, ImageProjectiveTransformV3 puts them at integers;
`_from_pil` converts, so that shear is about the top-left corner as PIL's
(1, s, 0, 0, 1, 0) and rotation is about the image centre as
`PIL.Image.rotate` (positive degrees turn the picture counter-clockwise).
"""

import math
from collections.abc import Sequence

import tensorflow as tf

from augment import joint
from uda_tf import common

# PIL's RGB -> L conversion: L = (19595 R + 38470 G + 7471 B + 2**15) >> 16.
# Every partial sum is an integer < 2**24, so float32 computes it exactly.
_L24 = (19595.0, 38470.0, 7471.0)


def as_image(image: tf.Tensor) -> tf.Tensor:
    """Converts to a tensor; raises ValueError unless it is uint8 [H, W, C]."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8 or image.shape.rank not in (None, 3):
        raise ValueError(
            f"augment.ops: image must be uint8 [H, W, C], got {image.dtype.name} {image.shape}."
        )
    return image


def as_mask(mask: tf.Tensor | None) -> tf.Tensor | None:
    """Converts to a tensor (None stays); raises ValueError unless integer [H, W(, 1)]."""
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if not mask.dtype.is_integer or mask.shape.rank not in (2, 3):
        raise ValueError(
            "augment.ops: mask must be integer [H, W] or [H, W, 1], got "
            f"{mask.dtype.name} {mask.shape}."
        )
    return mask


# ---------------------------------------------------------------- photometric


def invert(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.invert: 255 - x. uint8 [H, W, C] -> same."""
    image = as_image(image)
    return tf.constant(255, tf.uint8) - image


def posterize(image: tf.Tensor, bits: tf.Tensor | int) -> tf.Tensor:
    """ImageOps.posterize: keeps the `bits` high bits (1..8) of each value."""
    image = as_image(image)
    bits = tf.cast(bits, tf.int32)
    keep = tf.cast(tf.bitwise.left_shift(255, 8 - bits) % 256, tf.uint8)
    return tf.bitwise.bitwise_and(image, keep)


def solarize(image: tf.Tensor, threshold: tf.Tensor | int) -> tf.Tensor:
    """ImageOps.solarize: x if x < threshold else 255 - x (threshold in 0..256)."""
    image = as_image(image)
    threshold = tf.clip_by_value(tf.cast(threshold, tf.int32), 0, 256)
    # 255 - x == x ^ 255 on uint8; a select (tf.where) is several times slower.
    flip = tf.cast(image >= tf.cast(tf.minimum(threshold, 255), tf.uint8), tf.uint8)
    flip = flip * tf.cast(threshold <= 255, tf.uint8) * tf.constant(255, tf.uint8)
    return tf.bitwise.bitwise_xor(image, flip)


def _lut_index(image: tf.Tensor) -> tf.Tensor:
    """int32 [H, W, C]: value + 256 * channel, an index into a flat [C * 256] table."""
    channels = tf.shape(image)[-1]
    return joint.add_per_channel(tf.cast(image, tf.int32), tf.range(channels) * 256)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize, per channel, with Pillow's lookup-table rule.

    For each channel with histogram h: step = (sum(h) - h[last non-zero]) // 255;
    if fewer than two values occur or step == 0 the channel is kept, else
    lut[i] = (step // 2 + sum(h[:i])) // step (clipped to 255).
    """
    image = as_image(image)
    channels = tf.shape(image)[-1]
    index = _lut_index(image)
    hist = tf.math.bincount(tf.reshape(index, [-1]), minlength=channels * 256)
    hist = tf.reshape(hist, tf.stack([channels, 256]))
    present = hist > 0
    last = 255 - tf.argmax(
        tf.reverse(tf.cast(present, tf.int32), [1]), axis=1, output_type=tf.int32
    )
    h_last = tf.gather(hist, last, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - h_last) // 255  # [C]
    keep = tf.logical_or(tf.reduce_sum(tf.cast(present, tf.int32), 1) <= 1, step == 0)
    safe_step = tf.maximum(step, 1)[:, tf.newaxis]
    lut = (safe_step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe_step
    lut = tf.where(keep[:, tf.newaxis], tf.range(256)[tf.newaxis], lut)
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
    return tf.gather(tf.reshape(lut, [-1]), index)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast (cutoff 0), per channel.

    With lo, hi the channel's min and max: if hi <= lo the channel is kept, else
    x -> int(x * scale + offset), scale = 255 / (hi - lo), offset = -lo * scale,
    in float64 as Pillow computes its table (so the result is bit-exact).
    """
    image = as_image(image)
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)  # [C]
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    flat = hi <= lo
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
    scale = tf.where(flat, one, 255.0 / tf.maximum(hi - lo, one))
    offset = tf.where(flat, zero, -lo * scale)
    x = joint.mul_per_channel(tf.cast(image, tf.float64), scale)
    # Values are in [0, 255]: the cast truncates, as Pillow's int() does.
    return tf.cast(joint.add_per_channel(x, offset), tf.uint8)


def _luminance(x: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] with integer values -> float32 [H, W], PIL's "L" (exact)."""
    weighted = tf.linalg.matvec(x, tf.constant(_L24, tf.float32))
    return tf.floor((weighted + 32768.0) / 65536.0)


def _blend(degenerate: tf.Tensor, x: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Image.blend(degenerate, image, factor) on float32 values: clip, truncate, uint8.

    Pillow computes degenerate + factor * (image - degenerate) in float32.
    """
    factor = tf.cast(factor, tf.float32)
    out = degenerate + factor * (x - degenerate)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def brightness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Brightness: blend with black; factor 1 = identity."""
    image = as_image(image)
    factor = tf.cast(factor, tf.float32)
    out = tf.minimum(factor * tf.cast(image, tf.float32), 255.0)
    return tf.cast(tf.maximum(out, 0.0), tf.uint8)


def color(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Color: blend with the image's grey version ("L"); 1 = identity."""
    image = as_image(image)
    x = tf.cast(image, tf.float32)
    # Same-shape operands: broadcasting [H, W, 1] against [H, W, 3] is slow.
    grey = tf.tile(_luminance(x)[..., tf.newaxis], [1, 1, 3])
    return _blend(grey, x, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with the mean grey level; 1 = identity.

    The grey level is int(mean(L) + 0.5) over the image's "L" conversion.
    """
    image = as_image(image)
    x = tf.cast(image, tf.float32)
    # Row sums of integers < 2**24 are exact in float32; the total in float64.
    rows = tf.reduce_sum(_luminance(x), axis=1)
    total = tf.reduce_sum(tf.cast(rows, tf.float64))
    count = tf.cast(tf.shape(x)[0] * tf.shape(x)[1], tf.float64)
    mean = tf.floor(total / count + 0.5)
    return _blend(tf.cast(mean, tf.float32), x, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH; 1 = identity.

    The smoothed image is round(3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13) (the sum is
    an integer S and S / 13 is never a tie, so Pillow's float32 filter rounds
    to exactly this); as in Pillow, the one-pixel border is not filtered, so
    it is left unchanged.
    """
    image = as_image(image)

    def _sharpen():
        x = tf.cast(image, tf.float32)
        rows = x[:-2] + x[1:-1] + x[2:]
        box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
        centre = x[1:-1, 1:-1]
        smooth = tf.floor((box + 4.0 * centre) / 13.0 + 0.5)
        inner = _blend(smooth, centre, factor)
        # uint8 arithmetic wraps: border + 0, interior + (inner - image).
        return image + tf.pad(inner - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])

    shape = tf.shape(image)
    return tf.cond(tf.logical_and(shape[0] >= 3, shape[1] >= 3), _sharpen, lambda: image)


# --------------------------------------------------------------------- cutout


def _paste(x, top, bottom, left, right, patch):
    """x with x[top:bottom, left:right] replaced by `patch` (two concats: cheap copies)."""
    middle = tf.concat([x[top:bottom, :left], patch, x[top:bottom, right:]], axis=1)
    return tf.concat([x[:top], middle, x[bottom:]], axis=0)


def cutout(
    image: tf.Tensor,
    mask: tf.Tensor | None = None,
    *,
    center: tf.Tensor,
    size: tf.Tensor | int,
    fill: Sequence[int] | None = None,
    ignore_mask: bool = False,
    mask_fill: int = common.IGNORE_LABEL,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Fills a square with a colour; nothing moves (UDA's create_cutout_mask).

    The square is rows [cy - size // 2, cy + size // 2) and the same columns
    around cx, clipped at the borders, as the original's.

    Args:
      image: uint8 [H, W, C].
      mask: integer [H, W] or [H, W, 1], or None.
      center: int [2], (row, column) of the square's centre.
      size: int scalar, the square's side (0 = no-op).
      fill: C values; default `common.MEAN_RGB_UINT8`.
      ignore_mask: if True, the mask under the square becomes `mask_fill`;
        by default the labels stay.
      mask_fill: the ignore label.

    Returns:
      (image, mask), shapes and dtypes kept.
    """
    image, mask = as_image(image), as_mask(mask)
    fill = common.MEAN_RGB_UINT8 if fill is None else tuple(fill)
    center = tf.cast(center, tf.int32)
    half = tf.cast(size, tf.int32) // 2
    shape = tf.shape(image)
    top = tf.clip_by_value(center[0] - half, 0, shape[0])
    bottom = tf.clip_by_value(center[0] + half, top, shape[0])
    left = tf.clip_by_value(center[1] - half, 0, shape[1])
    right = tf.clip_by_value(center[1] + half, left, shape[1])
    fill_u8 = tf.constant(fill, tf.uint8)[tf.newaxis, tf.newaxis]
    patch = tf.tile(fill_u8, tf.stack([bottom - top, right - left, 1]))
    image = _paste(image, top, bottom, left, right, patch)
    if mask is not None and ignore_mask:
        extra = [1] * (mask.shape.rank - 2)
        mpatch = tf.fill(
            tf.stack([bottom - top, right - left] + extra), tf.cast(mask_fill, mask.dtype)
        )
        mask = _paste(mask, top, bottom, left, right, mpatch)
    return image, mask


# ------------------------------------------------------------------ geometric


def _from_pil(matrix: tf.Tensor) -> tf.Tensor:
    """PIL coordinates (pixel centres at +0.5) -> ImageProjectiveTransformV3's."""
    to_pil = tf.constant([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], tf.float32)
    from_pil = tf.constant([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]], tf.float32)
    return joint.matrix_to_transform(from_pil @ tf.cast(matrix, tf.float32) @ to_pil)


def _affine(a, b, c, d, e, f) -> tf.Tensor:
    """PIL's AFFINE data (a, b, c, d, e, f) as a float32 3x3 matrix."""
    zero, one = tf.constant(0.0), tf.constant(1.0)
    row = [tf.cast(v, tf.float32) for v in (a, b, c, d, e, f)]
    return tf.reshape(tf.stack(row + [zero, zero, one]), [3, 3])


def shear_x_transform(shear: tf.Tensor | float) -> tf.Tensor:
    """PIL transform(AFFINE, (1, shear, 0, 0, 1, 0)): x_in = x + shear * y. float32 [8]."""
    return _from_pil(_affine(1.0, shear, 0.0, 0.0, 1.0, 0.0))


def shear_y_transform(shear: tf.Tensor | float) -> tf.Tensor:
    """PIL transform(AFFINE, (1, 0, 0, shear, 1, 0)): y_in = shear * x + y. float32 [8]."""
    return _from_pil(_affine(1.0, 0.0, 0.0, shear, 1.0, 0.0))


def translate_transform(dx: tf.Tensor | float, dy: tf.Tensor | float) -> tf.Tensor:
    """PIL transform(AFFINE, (1, 0, dx, 0, 1, dy)): the picture moves by (-dx, -dy)."""
    return _from_pil(_affine(1.0, 0.0, dx, 0.0, 1.0, dy))


def rotate_transform(degrees: tf.Tensor | float, height, width) -> tf.Tensor:
    """PIL Image.rotate(degrees) about the centre (counter-clockwise). float32 [8]."""
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = tf.cast(width, tf.float32) / 2.0, tf.cast(height, tf.float32) / 2.0
    return _from_pil(
        _affine(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    )


GeometricResult = tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]


def _warp(image, mask, transform, interpolation, fill) -> GeometricResult:
    image, mask = as_image(image), as_mask(mask)
    image, mask = joint.warp_image_and_mask(
        image, mask, transform, interpolation=interpolation, fill=fill
    )
    return image, mask, transform


def shear_x(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    shear: tf.Tensor | float,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
) -> GeometricResult:
    """ShearX as PIL's (1, shear, 0, 0, 1, 0), about the top-left corner.

    Args:
      image: uint8 [H, W, 3].
      mask: integer [H, W] or [H, W, 1], or None.
      shear: float scalar (UDA: 0.03 * level, random sign).
      interpolation: of the image, "bilinear" or "nearest" (the mask: nearest).
      fill: image fill colour; default `common.MEAN_RGB_UINT8`. The mask is
        filled with `common.IGNORE_LABEL`.

    Returns:
      (image, mask, transform): uint8 [H, W, 3]; the mask, shape and dtype
      kept (None if none given); float32 [8], the output -> input transform.
    """
    return _warp(image, mask, shear_x_transform(shear), interpolation, fill)


def shear_y(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    shear: tf.Tensor | float,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
) -> GeometricResult:
    """ShearY as PIL's (1, 0, 0, shear, 1, 0). Arguments and result as `shear_x`."""
    return _warp(image, mask, shear_y_transform(shear), interpolation, fill)


def translate_x(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    pixels: tf.Tensor | float,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
) -> GeometricResult:
    """TranslateX as PIL's (1, 0, pixels, 0, 1, 0): the picture moves left for > 0.

    Arguments and result as `shear_x`, with `pixels` (float scalar) for `shear`.
    """
    return _warp(image, mask, translate_transform(pixels, 0.0), interpolation, fill)


def translate_y(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    pixels: tf.Tensor | float,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
) -> GeometricResult:
    """TranslateY as PIL's (1, 0, 0, 0, 1, pixels): the picture moves up for > 0.

    Arguments and result as `shear_x`, with `pixels` (float scalar) for `shear`.
    """
    return _warp(image, mask, translate_transform(0.0, pixels), interpolation, fill)


def rotate(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    degrees: tf.Tensor | float,
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
) -> GeometricResult:
    """Rotate as PIL's Image.rotate: about the centre, counter-clockwise for > 0.

    Arguments and result as `shear_x`, with `degrees` (float scalar) for `shear`.
    """
    shape = tf.shape(image)
    transform = rotate_transform(degrees, shape[0], shape[1])
    return _warp(image, mask, transform, interpolation, fill)
