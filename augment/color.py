"""The colour strong view of UniMatch / FixMatch for segmentation (SPEC §8).

UniMatch (dataset/semi.py) builds it on a PIL image with torchvision:
  RandomApply([ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8); RandomGrayscale(p=0.2);
  blur(p=0.5): ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2.0).
Here it is sampled, then applied: `sample_color_params(seed=...)` draws a dict of
tensors, `apply_color(image, params)` is deterministic, and `color_view` adds
the always-on Cutout of RandAugment and returns the same (image, mask,
transform) triple as `randaugment.distort`, so the two views are
interchangeable. Nothing moves: the transform is always the identity.

Definitions (torchvision's functional_pil, which calls Pillow):
  brightness  ImageEnhance.Brightness: x * f.
  contrast    ImageEnhance.Contrast: blend with the grey level
              m = int(mean(L) + 0.5), as Pillow's source computes it: the mean of
              the "L" image (each pixel already rounded), then rounded.
  saturation  ImageEnhance.Color: blend with the "L" image.
  hue         a shift of H in HSV by h (a fraction of the circle), wrapping.
  greyscale   the "L" image in three equal channels.
  blur        a separable Gaussian, radius ceil(3 sigma), reflect padding.
"L" is Pillow's ITU-R 601-2 luma in its fixed point,
(19595 R + 38470 G + 7471 B + 2**15) >> 16, i.e. round(0.299 R + 0.587 G +
0.114 B). Blends are degenerate + f * (image - degenerate).

Numerics. Every op runs on float32 values in [0, 255] and ends as Pillow's
does, so each op sees the integer image the previous one left, as in
UniMatch's chain of PIL images: the ImageEnhance blends (brightness, contrast,
saturation) clip to [0, 255] and truncate, as Pillow's Image.blend does;
greyscale rounds as Pillow's "L" conversion; hue and blur round to nearest
(halves up). A factor of 1, a zero hue shift or an op that does not fire is the
exact identity. Brightness, contrast, saturation and greyscale match Pillow bit
for bit on uint8 inputs. Two ops differ from Pillow by design, by a few
levels: hue is shifted in float HSV (tf.image.adjust_hue, the same maths as
rgb_to_hsv / hsv_to_rgb), where torchvision shifts Pillow's 8-bit HSV H plane
by int(255 h) mod 256; blur is an exact sampled Gaussian, where Pillow
approximates one by three extended box filters (whose support is about 3 sigma
too). Values stay float32 between ops and are cast to uint8 once.

Cost. The blur's vertical pass is a depthwise convolution whose channels are a
whole image row (W * 3 of them), its horizontal pass a convolution over groups
of 8 pixels (24 channels); both vectorise far better than a 3-channel
depthwise convolution on this layout.
"""

from collections.abc import Sequence

import tensorflow as tf

from augment import joint, randaugment
from augment import ops as ops_lib
from augment import seeds as seeds_lib
from uda_tf import common

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# UniMatch's ColorJitter(0.5, 0.5, 0.5, 0.25), RandomApply p, grey p, blur p.
BRIGHTNESS = CONTRAST = SATURATION = 0.5
HUE = 0.25
JITTER_PROB = 0.8
GREY_PROB = 0.2
BLUR_PROB = 0.5
SIGMA_RANGE = (0.1, 2.0)
# Pillow's RGB -> L weights, 19595 / 2**16 etc.: dyadic, so exact in float32, and
# products and sums with an integer image are exact too.
_L = (19595.0 / 65536.0, 38470.0 / 65536.0, 7471.0 / 65536.0)
_GROUP = 8  # pixels per channel group of the horizontal blur pass.
# Control flow here is explicit (tf.cond, tf.switch_case, Python loops over
# static ranges), so AutoGraph has nothing to convert; skipping it makes a
# tf.data map that calls color_view trace in about a second instead of
# transpiling some 80 functions (here and in randaugment, which it calls).
_no_autograph = tf.autograph.experimental.do_not_convert


@_no_autograph
def sample_color_params(
    *,
    seed: tf.Tensor,
    brightness: float = BRIGHTNESS,
    contrast: float = CONTRAST,
    saturation: float = SATURATION,
    hue: float = HUE,
    jitter_prob: float = JITTER_PROB,
    grey_prob: float = GREY_PROB,
    blur_prob: float = BLUR_PROB,
    sigma_range: Sequence[float] = SIGMA_RANGE,
) -> dict[str, tf.Tensor]:
    """Draws one example's colour-view parameters (stateless).

    Args:
      seed: int32/int64 [2], the example's seed.
      brightness: s, the brightness factor is uniform in [max(0, 1 - s), 1 + s].
      contrast: the same for the contrast factor.
      saturation: the same for the saturation factor.
      hue: the hue shift is uniform in [-hue, hue] (fraction of the circle).
      jitter_prob: probability that the colour jitter (all four ops) fires.
      grey_prob: probability of greyscale.
      blur_prob: probability of the Gaussian blur.
      sigma_range: (low, high) of the blur's sigma, in pixels.

    Returns:
      {"jitter": bool [], "order": int32 [4], a permutation of the indices of
       JITTER_OPS (the order they apply in), "brightness", "contrast",
       "saturation": float32 [] factors, "hue": float32 [] shift, "grey": bool [],
       "blur": bool [], "sigma": float32 []}.

    Raises:
      ValueError: a strength, probability or sigma range out of range.
    """
    _check_strengths(brightness, contrast, saturation, hue)
    for name, p in (("jitter_prob", jitter_prob), ("grey_prob", grey_prob),
                    ("blur_prob", blur_prob)):  # fmt: skip
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"sample_color_params: {name}={p!r}, expected a value in [0, 1].")
    low, high = (float(v) for v in sigma_range)
    if not 0.0 < low <= high:
        raise ValueError(
            f"sample_color_params: sigma_range={sigma_range!r}, expected 0 < low <= high."
        )
    jitter_seed, order_seed, factor_seed, hue_seed, grey_seed, blur_seed, sigma_seed = (
        seeds_lib.split_seed(seed, 7)
    )
    strengths = (brightness, contrast, saturation)
    lo = tf.constant([max(0.0, 1.0 - s) for s in strengths], tf.float32)
    hi = tf.constant([1.0 + s for s in strengths], tf.float32)
    factors = lo + (hi - lo) * tf.random.stateless_uniform([3], factor_seed)
    # torch.randperm(4): the argsort of 4 i.i.d. uniforms is a uniform permutation.
    order = tf.argsort(tf.random.stateless_uniform([4], order_seed))
    return {
        "jitter": tf.random.stateless_uniform([], jitter_seed) < jitter_prob,
        "order": order,
        "brightness": factors[0],
        "contrast": factors[1],
        "saturation": factors[2],
        "hue": tf.random.stateless_uniform([], hue_seed, -hue, hue),
        "grey": tf.random.stateless_uniform([], grey_seed) < grey_prob,
        "blur": tf.random.stateless_uniform([], blur_seed) < blur_prob,
        "sigma": tf.random.stateless_uniform([], sigma_seed, low, high),
    }


def _check_strengths(brightness, contrast, saturation, hue):
    for name, s in (("brightness", brightness), ("contrast", contrast),
                    ("saturation", saturation)):  # fmt: skip
        if float(s) < 0.0:
            raise ValueError(f"sample_color_params: {name}={s!r}, expected a value >= 0.")
    if not 0.0 <= float(hue) <= 0.5:
        raise ValueError(f"sample_color_params: hue={hue!r}, expected a value in [0, 0.5].")


# ------------------------------------------------------------- pure ops
# Each takes and returns float32 [H, W, 3] with values in [0, 255] (e.g. a uint8
# image cast to float32), so that a chain of them casts once.


def _grouped(x: tf.Tensor, fn_rows) -> tf.Tensor:
    """fn_rows(rows, g) on x viewed as rows of g pixels ([N / g, 3 g]), g = 8 if it divides N.

    Rows of 24 values vectorise much better than rows of 3 (GEMMs and column
    reductions over [N, 3] are several times slower on CPU).
    """
    num_pixels = tf.shape(x)[0] * tf.shape(x)[1]
    return tf.cond(
        tf.equal(num_pixels % _GROUP, 0),
        lambda: fn_rows(tf.reshape(x, [-1, 3 * _GROUP]), _GROUP),
        lambda: fn_rows(tf.reshape(x, [-1, 3]), 1),
    )


def _colour_matrix(x: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """x @ matrix per pixel, float32 [H, W, 3] @ [3, 3] (one GEMM, block-diagonal)."""

    def rows_fn(rows, g):
        blocks = tf.linalg.LinearOperatorKronecker(
            [tf.linalg.LinearOperatorIdentity(g), tf.linalg.LinearOperatorFullMatrix(matrix)]
        ).to_dense()
        return tf.reshape(tf.matmul(rows, blocks), tf.shape(x))

    return _grouped(x, rows_fn)


def _grey_matrix(factor: tf.Tensor | float) -> tf.Tensor:
    """[3, 3] M with x @ M = factor * x + (1 - factor) * L(x) in every channel."""
    factor = tf.cast(factor, tf.float32)
    return factor * tf.eye(3) + (1.0 - factor) * tf.tile(tf.constant(_L)[:, None], [1, 3])


def _clip_blend(y: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Clips a blend to [0, 255]; for factor <= 1 it is a convex combination, already inside."""
    return tf.cond(factor > 1.0, lambda: tf.clip_by_value(y, 0.0, 255.0), lambda: y)


@_no_autograph
def brightness(x: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Brightness: min(factor * x, 255); factor >= 0, 1 = identity."""
    return tf.minimum(tf.cast(factor, tf.float32) * x, 255.0)


@_no_autograph
def contrast(x: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with the grey level m; 1 = identity.

    m = floor(mean(L) + 0.5), L the 601 luma. Pillow takes the mean of its "L"
    image, whose pixels are already rounded; the mean of the unrounded L used
    here differs by far less than a level, so m is Pillow's except when the
    mean lies within a few thousandths of a half-integer.
    """

    def channel_sums(rows, g):
        # Column sums in float32 (exact for integer images: < 2**24 per column
        # at up to 65793 rows), the rest in float64.
        sums = tf.cast(tf.reduce_sum(rows, axis=0), tf.float64)
        return tf.reduce_sum(tf.reshape(sums, [g, 3]), axis=0)

    sums = _grouped(x, channel_sums)
    count = tf.cast(tf.shape(x)[0] * tf.shape(x)[1], tf.float64)
    mean_l = tf.reduce_sum(sums * tf.constant(_L, tf.float64)) / count
    grey = tf.cast(tf.floor(mean_l + 0.5), tf.float32)
    factor = tf.cast(factor, tf.float32)
    return _clip_blend(factor * x + (1.0 - factor) * grey, factor)


@_no_autograph
def saturation(x: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """ImageEnhance.Color: blend with the L image, factor * x + (1 - factor) * L.

    0 = greyscale, 1 = identity (exact: the matrix is then the identity).
    """
    factor = tf.cast(factor, tf.float32)
    return _clip_blend(_colour_matrix(x, _grey_matrix(factor)), factor)


@_no_autograph
def hue_shift(x: tf.Tensor, shift: tf.Tensor | float) -> tf.Tensor:
    """Adds `shift` (fraction of the circle, wrapping) to H in HSV.

    tf.image.adjust_hue is rgb_to_hsv, H + shift mod 1, hsv_to_rgb in one kernel;
    its maths are scale-free, so it runs on [0, 255] directly. The result lies
    between the pixel's min and max channel, so it needs no clipping.
    """
    return tf.image.adjust_hue(x, tf.cast(shift, tf.float32))


@_no_autograph
def greyscale(x: tf.Tensor) -> tf.Tensor:
    """RandomGrayscale on PIL: convert("L") in three equal channels.

    On an integer image every product and sum is exact in float32, so the
    final rounding gives Pillow's (19595 R + 38470 G + 7471 B + 2**15) >> 16.
    """
    return _colour_matrix(x, _grey_matrix(0.0))


@_no_autograph
def blur_radius(sigma: tf.Tensor | float) -> tf.Tensor:
    """int32 [], the Gaussian's radius ceil(3 sigma) (at least 1)."""
    return tf.maximum(tf.cast(tf.math.ceil(3.0 * tf.cast(sigma, tf.float32)), tf.int32), 1)


@_no_autograph
def gaussian_kernel(sigma: tf.Tensor | float) -> tf.Tensor:
    """float32 [2 r + 1], r = blur_radius(sigma): exp(-t**2 / (2 sigma**2)), summing to 1.

    As torchvision's _get_gaussian_kernel1d, with kernel size 2 ceil(3 sigma) + 1.
    """
    sigma = tf.cast(sigma, tf.float32)
    r = blur_radius(sigma)
    t = tf.cast(tf.range(-r, r + 1), tf.float32)
    w = tf.exp(-0.5 * tf.square(t / sigma))
    return w / tf.reduce_sum(w)


def _reflect(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Reflect padding ("dcb|abcd|cba", no edge repeat) of any index into [0, size)."""
    period = tf.maximum(2 * size - 2, 1)
    index = tf.math.floormod(index, period)
    return tf.where(index >= size, period - index, index)


def _reflect_pad(x: tf.Tensor, axis: int, before: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
    """Reflect-pads axis 0 or 1 of [H, W, C]; tf.pad where it can, a gather otherwise."""
    size = tf.shape(x)[axis]

    def _pad():
        paddings = tf.stack([tf.zeros([2], tf.int32)] * 3)
        paddings = tf.tensor_scatter_nd_update(paddings, [[axis]], [tf.stack([before, after])])
        return tf.pad(x, paddings, mode="REFLECT")

    def _gather():  # pads of a side or more (tiny images): reflect repeatedly.
        return tf.gather(x, _reflect(tf.range(-before, size + after), size), axis=axis)

    return tf.cond(tf.logical_and(before < size, after < size), _pad, _gather)


def _vertical_pass(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Convolves the rows of float32 [H, W, 3] with `kernel` [2 r + 1], reflect padding."""
    shape = tf.shape(x)
    r = tf.shape(kernel)[0] // 2
    rows = _reflect_pad(x, 0, r, r)
    width = shape[1] * shape[2]  # one depthwise channel per value of a row.
    rows = tf.reshape(rows, tf.stack([1, shape[0] + 2 * r, 1, width]))
    taps = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), tf.stack([1, 1, width, 1]))
    out = tf.nn.depthwise_conv2d(rows, taps, [1, 1, 1, 1], "VALID")
    return tf.reshape(out, shape)


def _horizontal_pass(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Convolves the columns of float32 [H, W, 3] with `kernel`, reflect padding.

    Groups of G = 8 pixels become 3 G channels; output group g reads input groups
    g - D .. g + D (D = ceil(r / G)) through a [2 D + 1, 3 G, 3 G] filter.
    """
    g = _GROUP
    shape = tf.shape(x)
    height, width = shape[0], shape[1]
    r = tf.shape(kernel)[0] // 2
    d = (r + g - 1) // g
    groups = (width + g - 1) // g
    padded = _reflect_pad(x, 1, g * d, g * (groups + d) - width)
    padded = tf.reshape(padded, tf.stack([1, height, groups + 2 * d, 3 * g]))
    # offset[k, q, p]: input pixel q of group g + k - d feeds output pixel p.
    offset = (
        g * tf.range(-d, d + 1)[:, None, None]
        + tf.range(g)[None, :, None]
        - tf.range(g)[None, None, :]
    )
    taps = tf.where(
        tf.abs(offset) <= r, tf.gather(kernel, tf.clip_by_value(offset + r, 0, 2 * r)), 0.0
    )
    taps = tf.einsum("kqp,ce->kqcpe", taps, tf.eye(3))
    taps = tf.reshape(taps, tf.stack([1, 2 * d + 1, 3 * g, 3 * g]))
    out = tf.nn.conv2d(padded, taps, 1, "VALID")
    return tf.reshape(out, tf.stack([height, groups * g, 3]))[:, :width]


@_no_autograph
def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor | float) -> tf.Tensor:
    """Separable Gaussian blur (`gaussian_kernel`), reflect padding.

    The stand-in for ImageFilter.GaussianBlur(radius=sigma), whose three box
    passes span about 3 sigma too. Weights are positive and sum to 1, so the
    result needs no clipping.
    """
    kernel = gaussian_kernel(sigma)
    return _horizontal_pass(_vertical_pass(x, kernel), kernel)


# ----------------------------------------------------------------- apply


def _jitter(x: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """The four jitter ops in the order `params["order"]`.

    A loop over the 4 slots, each a tf.switch_case on the slot's op: the graph
    holds each op once (4 slots of 4 branches would hold each 4 times).
    """

    def slot(i, y):
        branches = [
            lambda: brightness(y, params["brightness"]),
            lambda: contrast(y, params["contrast"]),
            lambda: saturation(y, params["saturation"]),
            lambda: hue_shift(y, params["hue"]),
        ]
        return i + 1, tf.ensure_shape(tf.switch_case(params["order"][i], branches), y.shape)

    num_ops = len(JITTER_OPS)
    _, x = tf.while_loop(lambda i, _: i < num_ops, slot, (tf.constant(0), x), parallel_iterations=1)
    return x


def _as_rgb(image: tf.Tensor, caller: str) -> tf.Tensor:
    image = ops_lib.as_image(image)
    if image.shape.rank is not None and image.shape[-1] not in (None, 3):
        raise ValueError(f"{caller}: image must be uint8 [H, W, 3], got {image.shape}.")
    return image


@_no_autograph
def apply_color(image: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Applies sampled parameters (`sample_color_params`) deterministically.

    Order, as UniMatch's: the jitter (its four ops in `params["order"]`), then
    greyscale, then blur; each only where its flag is set.

    Args:
      image: uint8 [H, W, 3].
      params: the dict of `sample_color_params`.

    Returns:
      uint8 [H, W, 3].
    """
    image = _as_rgb(image, "apply_color")
    x = tf.cast(image, tf.float32)
    x = tf.cond(params["jitter"], lambda: _jitter(x, params), lambda: x)
    x = tf.cond(params["grey"], lambda: greyscale(x), lambda: x)
    x = tf.cond(params["blur"], lambda: gaussian_blur(x, params["sigma"]), lambda: x)
    # Values lie in [0, 255]: + 0.5 and truncation round half up.
    return tf.cast(x + 0.5, tf.uint8)


@_no_autograph
def color_view(
    image: tf.Tensor,
    mask: tf.Tensor | None = None,
    *,
    seed: tf.Tensor,
    cutout: bool = True,
    fill: Sequence[int] | None = None,
    cutout_ignore: bool = False,
    mask_fill: int = common.IGNORE_LABEL,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """The colour strong view of one example, in `randaugment.distort`'s form.

    `apply_color(sample_color_params(...))`, then (if `cutout`) the always-on
    Cutout of RandAugment (`randaugment.apply_policy` with no op layers: a
    square of half the shorter side at a uniform centre). Works eagerly and
    inside `tf.data.Dataset.map` (graph mode).

    Args:
      image: uint8 [H, W, 3].
      mask: integer [H, W] or [H, W, 1], or None; returned untouched unless
        `cutout_ignore`.
      seed: int32/int64 [2], the example's seed (`augment.seeds.example_seed`).
      cutout: whether the always-on Cutout follows.
      fill: Cutout colour; default `common.MEAN_RGB_UINT8`.
      cutout_ignore: mark the mask under the Cutout square as `mask_fill`.
      mask_fill: the ignore label.

    Returns:
      (image uint8 [H, W, 3], mask (shape, dtype kept) or None, transform
      float32 [8]: always the identity, nothing moves).
    """
    image = _as_rgb(image, "color_view")
    mask = ops_lib.as_mask(mask)
    color_seed, cutout_seed = seeds_lib.split_seed(seed, 2)
    image = apply_color(image, sample_color_params(seed=color_seed))
    if not cutout:
        return image, mask, joint.identity_transform()
    cutout_params = randaugment.sample_policy(
        cutout_seed, image_shape=tf.shape(image), num_layers=0, cutout=True
    )
    return randaugment.apply_policy(
        image, mask, cutout_params, fill=fill, cutout_ignore=cutout_ignore, mask_fill=mask_fill
    )
