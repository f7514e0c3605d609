"""RandAugment as UDA samples it, on an image and its mask, in graph mode.

Per image (image/randaugment/policies.py of google-research/uda): `num_layers`
(2) ops drawn uniformly with replacement from the 15 of `OP_NAMES`, each fired
with probability `prob` (0.5) at its own level drawn uniformly from 1..9 (of
10), geometric ones with a random sign; then an always-on Cutout of half the
shorter side. Sample, then apply: `sample_policy(seed)` draws a dict of
tensors, `apply_policy(image, mask, params)` is deterministic; `distort` does
both.

Order of application (documented difference from the original's strict
sequence, which warped, and re-warped, with nearest interpolation):
  1. the photometric ops, in their sampled order, on the unwarped image;
  2. ONE warp by the composition of all fired geometric ops, in their order
     (image bilinear or nearest, mean-colour fill; mask nearest, fill 255);
  3. the fired Cutout ops, then the always-on Cutout, in the output frame.
Pointwise photometric ops (Invert, Posterize, Solarize, Brightness, Color)
commute exactly with a nearest warp; the others (Equalize, AutoContrast,
Contrast statistics, Sharpness at the frame edge) see the unwarped frame
rather than one that contains fill, and fill pixels always end as the mean
colour, as the original's final "alpha == 0 -> mean" step makes them. Cutout
squares are placed uniformly in the output frame, the same distribution as
the original's.

Magnitudes at level L (SPEC §5): shear 0.03 L; translate round(L / 32 of the
side) pixels; rotate 3 L degrees; Cutout op side 2 L / 32 of the shorter side;
Posterize bits 4 - int(0.4 L); Solarize threshold 256 - int(25.6 L);
Color/Contrast/Brightness/Sharpness factor 0.18 L + 0.1.
"""

from collections.abc import Sequence

import tensorflow as tf

from augment import joint
from augment import ops as ops_lib
from augment import seeds as seeds_lib
from uda_tf import common

OP_NAMES = (
    "Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize",
    "ShearX", "TranslateX", "TranslateY", "ShearY", "Rotate",
    "Equalize", "Contrast", "Color", "Solarize", "Brightness",
)  # fmt: skip
GEOMETRIC_OPS = ("ShearX", "TranslateX", "TranslateY", "ShearY", "Rotate")
PHOTOMETRIC_OPS = tuple(n for n in OP_NAMES if n not in GEOMETRIC_OPS)  # Cutout included.
OP_SETS = {"all": OP_NAMES, "photometric": PHOTOMETRIC_OPS, "geometric": GEOMETRIC_OPS}
MAX_LEVEL = 10  # PARAMETER_MAX of the original; levels are drawn from 1..9.
_CUTOUT = OP_NAMES.index("Cutout")


def _enhance_factor(level):
    # float_parameter(level, 1.8) + 0.1 in float64 as Python computes it; Pillow
    # then blends with it as a float32.
    return tf.cast(tf.cast(level, tf.float64) * 1.8 / MAX_LEVEL + 0.1, tf.float32)


_PIXEL_OPS = {
    "Invert": lambda image, level: ops_lib.invert(image),
    "AutoContrast": lambda image, level: ops_lib.autocontrast(image),
    "Equalize": lambda image, level: ops_lib.equalize(image),
    "Posterize": lambda image, level: ops_lib.posterize(image, 4 - level * 4 // MAX_LEVEL),
    "Solarize": lambda image, level: ops_lib.solarize(image, 256 - level * 256 // MAX_LEVEL),
    "Sharpness": lambda image, level: ops_lib.sharpness(image, _enhance_factor(level)),
    "Contrast": lambda image, level: ops_lib.contrast(image, _enhance_factor(level)),
    "Color": lambda image, level: ops_lib.color(image, _enhance_factor(level)),
    "Brightness": lambda image, level: ops_lib.brightness(image, _enhance_factor(level)),
}
_PIXEL_NAMES = tuple(n for n in OP_NAMES if n in _PIXEL_OPS)
# Op index -> branch of the photometric switch; the last branch is a no-op,
# also selected by index len(OP_NAMES) (an op that did not fire).
_PIXEL_BRANCH = tuple(_PIXEL_NAMES.index(n) if n in _PIXEL_OPS else 9 for n in OP_NAMES) + (9,)
# Op index -> branch of the geometric switch; the last branch is the identity.
_GEO_BRANCH = tuple(GEOMETRIC_OPS.index(n) if n in GEOMETRIC_OPS else 5 for n in OP_NAMES) + (5,)


def geometric_transform(
    name: str, level: tf.Tensor | int, sign: tf.Tensor | float, height, width
) -> tf.Tensor:
    """The transform of one geometric op at UDA's magnitude.

    Args:
      name: one of `GEOMETRIC_OPS`.
      level: int 1..9 (of 10).
      sign: +1 or -1.
      height: image height (int or int32 scalar tensor).
      width: image width.

    Returns:
      float32 [8], output -> input (ImageProjectiveTransformV3 convention).

    Raises:
      ValueError: `name` is not a geometric op.
    """
    level = tf.cast(level, tf.float32)
    sign = tf.cast(sign, tf.float32)
    if name in ("ShearX", "ShearY"):
        shear = sign * level * 0.3 / MAX_LEVEL
        return (ops_lib.shear_x_transform if name == "ShearX" else ops_lib.shear_y_transform)(shear)
    if name in ("TranslateX", "TranslateY"):
        side = tf.cast(width if name == "TranslateX" else height, tf.float32)
        pixels = sign * tf.floor(level * side / 32.0 + 0.5)
        dx, dy = (pixels, 0.0) if name == "TranslateX" else (0.0, pixels)
        return ops_lib.translate_transform(dx, dy)
    if name == "Rotate":
        degrees = sign * tf.floor(level * 30.0 / MAX_LEVEL)
        return ops_lib.rotate_transform(degrees, height, width)
    raise ValueError(f"geometric_transform: name={name!r}, expected one of {GEOMETRIC_OPS}.")


def cutout_op_size(level: tf.Tensor | int, height, width) -> tf.Tensor:
    """Side of the Cutout op's square, int32 []: int(2 L) / 32 of the shorter side."""
    short = tf.minimum(tf.cast(height, tf.int32), tf.cast(width, tf.int32))
    return (tf.cast(level, tf.int32) * 20 // MAX_LEVEL) * short // 32


def _op_names(ops: str | Sequence[str]) -> tuple[str, ...]:
    names = OP_SETS.get(ops) if isinstance(ops, str) else tuple(ops)
    if not names or any(n not in OP_NAMES for n in names):
        raise ValueError(f"ops={ops!r}: expected one of {tuple(OP_SETS)} or names from {OP_NAMES}.")
    return names


def sample_policy(
    seed: tf.Tensor,
    *,
    image_shape: tf.Tensor | Sequence[int] | None = None,
    height: tf.Tensor | int | None = None,
    width: tf.Tensor | int | None = None,
    num_layers: int = 2,
    prob: float = 0.5,
    cutout: bool = True,
    ops: str | Sequence[str] = "all",
) -> dict[str, tf.Tensor]:
    """Draws one example's RandAugment parameters (stateless).

    Args:
      seed: int32/int64 [2], the example's seed.
      image_shape: [H, W, ...] of the image (e.g. `tf.shape(image)`), or give
        `height` and `width`.
      height: image height, if no `image_shape`.
      width: image width, if no `image_shape`.
      num_layers: ops drawn per image (UDA: 2).
      prob: probability that each drawn op fires (UDA: 0.5).
      cutout: whether the always-on Cutout follows.
      ops: "all" (15 ops), "photometric" (no geometric op), "geometric", or a
        sequence of names from `OP_NAMES` to draw from uniformly.

    Returns:
      {"op_indices": int32 [n] (into OP_NAMES), "levels": int32 [n] in 1..9,
       "signs": float32 [n] in {-1, 1}, "fire": bool [n],
       "op_cutout_centers": int32 [n, 2] (row, col), used by fired Cutout ops,
       "cutout_center": int32 [2] (row, col), "cutout": bool []}.

    Raises:
      ValueError: bad num_layers, prob, ops, or no shape given.
    """
    names = _op_names(ops)
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"sample_policy: num_layers={num_layers!r}, expected an int >= 0.")
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"sample_policy: prob={prob!r}, expected a value in [0, 1].")
    if image_shape is not None:
        height, width = image_shape[0], image_shape[1]
    if height is None or width is None:
        raise ValueError("sample_policy: give image_shape, or height and width.")
    size = tf.cast(tf.stack([height, width]), tf.float32)
    op_seed, level_seed, sign_seed, fire_seed, cutout_seed = seeds_lib.split_seed(seed, 5)
    n = num_layers
    choice = tf.random.stateless_uniform([n], op_seed, 0, len(names), dtype=tf.int32)
    table = tf.constant([OP_NAMES.index(name) for name in names], tf.int32)
    levels = tf.random.stateless_uniform([n], level_seed, 1, MAX_LEVEL, dtype=tf.int32)
    signs = tf.random.stateless_uniform([n], sign_seed, 0, 2, dtype=tf.int32) * 2 - 1
    fire = tf.random.stateless_uniform([n], fire_seed) < prob
    centers = tf.random.stateless_uniform([n + 1, 2], cutout_seed)
    centers = tf.cast(tf.floor(centers * size), tf.int32)
    return {
        "op_indices": tf.gather(table, choice),
        "levels": levels,
        "signs": tf.cast(signs, tf.float32),
        "fire": fire,
        "op_cutout_centers": centers[:n],
        "cutout_center": centers[n],
        "cutout": tf.constant(bool(cutout)),
    }


def _pixel_switch(image: tf.Tensor, op_index: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """Runs the photometric op `op_index` (no-op for others): only that branch executes."""
    branches = [lambda n=n: _PIXEL_OPS[n](image, level) for n in _PIXEL_NAMES]
    branches.append(lambda: image)
    return tf.switch_case(tf.gather(_PIXEL_BRANCH, op_index), branches)


def _geometric_switch(op_index, level, sign, height, width) -> tf.Tensor:
    """The transform of the geometric op `op_index` (identity for others)."""
    branches = [
        lambda n=n: geometric_transform(n, level, sign, height, width) for n in GEOMETRIC_OPS
    ]
    branches.append(joint.identity_transform)
    return tf.switch_case(tf.gather(_GEO_BRANCH, op_index), branches)


def _maybe(pred, fn, image, mask):
    """tf.cond(pred, fn, identity) on (image, mask), mask possibly None."""
    if mask is None:
        return tf.cond(pred, lambda: fn(image, None)[0], lambda: image), None
    return tf.cond(pred, lambda: fn(image, mask), lambda: (image, mask))


def apply_policy(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    params: dict[str, tf.Tensor],
    *,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
    cutout_ignore: bool = False,
    mask_fill: int = common.IGNORE_LABEL,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """Applies sampled parameters (`sample_policy`) deterministically.

    Order: photometric ops in sampled order, one composed warp, Cutout ops,
    the always-on Cutout (see the module docstring).

    Args:
      image: uint8 [H, W, 3].
      mask: integer [H, W] or [H, W, 1], or None.
      params: the dict of `sample_policy` (its layer count must be static).
      interpolation: of the image, "bilinear" or "nearest"; the mask: nearest.
      fill: image fill colour (warp and Cutout); default the mean colour.
      cutout_ignore: if True, the mask under Cutout squares becomes
        `mask_fill`; by default labels stay.
      mask_fill: the mask's out-of-frame label (the ignore label).

    Returns:
      (image, mask, transform): uint8 [H, W, 3]; the mask, shape and dtype
      kept, None if none given; float32 [8], the composed output -> input
      transform of the geometric ops (identity if none fired).
    """
    joint.check_interpolation(interpolation)
    image = ops_lib.as_image(image)
    mask = ops_lib.as_mask(mask)
    num_layers = params["op_indices"].shape[0]
    if num_layers is None:
        raise ValueError("apply_policy: params['op_indices'] needs a static length.")
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    op_indices, levels, signs = params["op_indices"], params["levels"], params["signs"]
    # Op index of each layer, len(OP_NAMES) (the no-op branches) if it did not fire.
    none = tf.constant(len(OP_NAMES), tf.int32)
    active = [tf.where(params["fire"][i], op_indices[i], none) for i in range(num_layers)]
    for i in range(num_layers):
        image = _pixel_switch(image, active[i], levels[i])
    transform = joint.identity_transform()
    for i in range(num_layers):
        step = _geometric_switch(active[i], levels[i], signs[i], height, width)
        transform = joint.compose_transforms(transform, step)
    moved = tf.reduce_any(tf.not_equal(transform, joint.identity_transform()))

    def _warp(im, m):
        return joint.warp_image_and_mask(
            im, m, transform, interpolation=interpolation, fill=fill, mask_fill=mask_fill
        )

    image, mask = _maybe(moved, _warp, image, mask)
    # Cutout ops (those that fired), then the always-on Cutout.
    squares = [
        (
            tf.equal(active[i], _CUTOUT),
            params["op_cutout_centers"][i],
            cutout_op_size(levels[i], height, width),
        )
        for i in range(num_layers)
    ]
    squares.append((params["cutout"], params["cutout_center"], tf.minimum(height, width) // 2))
    for pred, center, size in squares:

        def _cutout(im, m, center=center, size=size):
            return ops_lib.cutout(
                im, m, center=center, size=size, fill=fill, ignore_mask=cutout_ignore,
                mask_fill=mask_fill,
            )  # fmt: skip

        image, mask = _maybe(pred, _cutout, image, mask)
    return image, mask, transform


def distort(
    image: tf.Tensor,
    mask: tf.Tensor | None = None,
    *,
    seed: tf.Tensor,
    num_layers: int = 2,
    prob: float = 0.5,
    cutout: bool = True,
    ops: str | Sequence[str] = "all",
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
    cutout_ignore: bool = False,
    mask_fill: int = common.IGNORE_LABEL,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """UDA's RandAugment + Cutout of one example: `apply_policy(sample_policy(seed))`.

    Works eagerly and inside `tf.data.Dataset.map` (graph mode).

    Args:
      image: uint8 [H, W, 3].
      mask: integer [H, W] or [H, W, 1], or None.
      seed: int32/int64 [2], the example's seed (`augment.seeds.example_seed`).
      num_layers: ops drawn per image.
      prob: probability that each drawn op fires.
      cutout: whether the always-on Cutout follows.
      ops: "all", "photometric", "geometric", or a sequence of op names.
      interpolation: of the image, "bilinear" or "nearest".
      fill: image fill colour; default `common.MEAN_RGB_UINT8`.
      cutout_ignore: mark the mask under Cutout squares as ignore.
      mask_fill: the mask's out-of-frame (and Cutout-ignore) label.

    Returns:
      (image uint8 [H, W, 3], mask (shape, dtype kept) or None, transform
      float32 [8]: output -> input, ImageProjectiveTransformV3 convention).
    """
    image = ops_lib.as_image(image)
    params = sample_policy(
        seed,
        image_shape=tf.shape(image),
        num_layers=num_layers,
        prob=prob,
        cutout=cutout,
        ops=ops,
    )
    return apply_policy(
        image,
        mask,
        params,
        interpolation=interpolation,
        fill=fill,
        cutout_ignore=cutout_ignore,
        mask_fill=mask_fill,
    )


def distort_batch(
    images: tf.Tensor,
    masks: tf.Tensor | None = None,
    *,
    seeds: tf.Tensor,
    **kwargs,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """`distort` on each example of a batch, each with its own seed (tf.map_fn).

    Args:
      images: uint8 [B, H, W, 3].
      masks: integer [B, H, W] or [B, H, W, 1], or None.
      seeds: int [B, 2], one seed per example.
      **kwargs: the keyword arguments of `distort` (num_layers, prob, ...).

    Returns:
      (images uint8 [B, H, W, 3], masks or None, transforms float32 [B, 8]).
    """
    images = tf.convert_to_tensor(images)
    seeds = tf.convert_to_tensor(seeds)
    if masks is None:
        out_images, transforms = tf.map_fn(
            lambda x: _drop_mask(distort(x[0], None, seed=x[1], **kwargs)),
            (images, seeds),
            fn_output_signature=(tf.uint8, tf.float32),
        )
        return out_images, None, transforms
    masks = tf.convert_to_tensor(masks)
    return tf.map_fn(
        lambda x: distort(x[0], x[1], seed=x[2], **kwargs),
        (images, masks, seeds),
        fn_output_signature=(tf.uint8, masks.dtype, tf.float32),
    )


def _drop_mask(result):
    image, _, transform = result
    return image, transform


def apply_op(
    image: tf.Tensor,
    mask: tf.Tensor | None,
    *,
    name: str,
    level: tf.Tensor | int,
    sign: tf.Tensor | float = 1,
    interpolation: str = "bilinear",
    fill: Sequence[int] | None = None,
    cutout_center: tf.Tensor | Sequence[int] | None = None,
    cutout_ignore: bool = False,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """Applies one op of `OP_NAMES` at a fixed level (UDA's magnitudes).

    Args:
      image: uint8 [H, W, 3].
      mask: integer [H, W] or [H, W, 1], or None; only geometric ops move it.
      name: the op, e.g. "Rotate", "Posterize", "Cutout".
      level: int 1..9 (of 10).
      sign: +1 or -1, the direction of a geometric op.
      interpolation: of the image for geometric ops.
      fill: image fill colour; default the mean colour.
      cutout_center: (row, col) of the Cutout op's square; default the image
        centre.
      cutout_ignore: mark the mask under the Cutout square as ignore.

    Returns:
      (image, mask, transform float32 [8]; identity for non-geometric ops).

    Raises:
      ValueError: unknown `name`.
    """
    image = ops_lib.as_image(image)
    mask = ops_lib.as_mask(mask)
    shape = tf.shape(image)
    level = tf.convert_to_tensor(level, tf.int32)
    if name in GEOMETRIC_OPS:
        transform = geometric_transform(name, level, sign, shape[0], shape[1])
        image, mask = joint.warp_image_and_mask(
            image, mask, transform, interpolation=interpolation, fill=fill
        )
        return image, mask, transform
    if name == "Cutout":
        center = shape[:2] // 2 if cutout_center is None else cutout_center
        size = cutout_op_size(level, shape[0], shape[1])
        image, mask = ops_lib.cutout(
            image, mask, center=center, size=size, fill=fill, ignore_mask=cutout_ignore
        )
    elif name in _PIXEL_OPS:
        image = _PIXEL_OPS[name](image, level)
    else:
        raise ValueError(f"apply_op: name={name!r}, expected one of {OP_NAMES}.")
    return image, mask, joint.identity_transform()
