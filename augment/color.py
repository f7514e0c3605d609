"""The colour strong view of UniMatch / FixMatch for segmentation (SPEC §8).

UniMatch (dataset/semi.py) builds it on a PIL image with torchvision:
  RandomApply([ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8); RandomGrayscale(p=0.2);
  blur(p=0.5): ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2.0).
Here it is sampled, then applied: `sample_color_params(seed=...)` draws a dict of
tensors, `apply_color(image, params)` is deterministic, and `color_view` adds
the always-on Cutout of RandAugment and returns the same (image, mask,
transform) triple as `randaugment.distort`, so the two views are
interchangeable. Nothing moves: the transform is always the identity.

Definitions (torchvision's functional_pil, which calls Pillow; L is the ITU-R
601-2 luma with Pillow's weights 19595, 38470, 7471 / 2**16, i.e. 0.299 R +
0.587 G + 0.114 B; a blend is f * x + (1 - f) * degenerate):
  brightness  ImageEnhance.Brightness: f * x.
  contrast    ImageEnhance.Contrast: blend with the grey level m =
              floor(mean(L) + 0.5). Pillow's source takes int(mean + 0.5) of
              the mean of its "L" image, whose pixels are already rounded; we
              take the mean of the unrounded L (see `contrast`).
  saturation  ImageEnhance.Color: blend with the L image.
  hue         a shift of H in HSV by h (a fraction of the circle), wrapping.
  greyscale   RandomGrayscale: L in three equal channels.
  blur        a separable Gaussian (torchvision's _get_gaussian_kernel1d),
              radius ceil(3 sigma), reflect padding ("dcb|abcd|cba").

Numerics. The ops run on float32 values in [0, 255]; the image is cast to
uint8 once, at the end, rounding half up. Each op clips to [0, 255], as every
intermediate PIL image is clipped, so the order matters as in UniMatch; values
are not rounded between ops. Against UniMatch's chain of PIL images: Pillow
truncates each blend (one op here is within +1 of Pillow's, never below;
greyscale of a uint8 image is convert("L") exactly); hue is shifted in float
HSV (tf.image.adjust_hue), where torchvision shifts Pillow's 8-bit H plane by
int(255 h) mod 256; blur is a sampled Gaussian where Pillow runs three box
filters of the same ~3 sigma support (within a level or two for sigma >= 1).
A factor of 1, a zero shift or an op that does not fire is the exact identity.

Cost (bench/augment.py): a few memory passes per op. Channel sums and the
colour matrix work on rows of 8 pixels (24 values), which vectorise far better
than rows of 3; the blur pads once, then runs a depthwise convolution whose
W * 3 channels are a whole row and a convolution over groups of 8 pixels.
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
_GROUP = 8  # pixels per row of the grouped views (colour matrix, sums, blur).
# Control flow here is explicit (tf.cond, tf.switch_case, tf.while_loop), so
# AutoGraph has nothing to convert; skipping it spares a tf.data map of
# color_view transpiling some 80 functions (here and in randaugment) per trace.
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
    strengths = (brightness, contrast, saturation)
    for name, value in zip(JITTER_OPS, strengths):
        _check(name, value, float(value) >= 0.0, "a value >= 0")
    _check("hue", hue, 0.0 <= float(hue) <= 0.5, "a value in [0, 0.5]")
    for name, p in (
        ("jitter_prob", jitter_prob),
        ("grey_prob", grey_prob),
        ("blur_prob", blur_prob),
    ):
        _check(name, p, 0.0 <= float(p) <= 1.0, "a value in [0, 1]")
    low, high = (float(v) for v in sigma_range)
    _check("sigma_range", sigma_range, 0.0 < low <= high, "(low, high) with 0 < low <= high")
    jitter_seed, order_seed, factor_seed, hue_seed, grey_seed, blur_seed, sigma_seed = (
        seeds_lib.split_seed(seed, 7)
    )
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


def _check(name, value, ok, expected):
    if not ok:
        raise ValueError(f"sample_color_params: {name}={value!r}, expected {expected}.")


# ------------------------------------------------------------- pure ops
# Each takes and returns float32 [H, W, 3] with values in [0, 255] (e.g. a uint8
# image cast to float32), so that a chain of them casts once.


def _grouped(x: tf.Tensor, fn) -> tf.Tensor:
    """fn(rows, g) on x viewed as rows of g pixels, [N / g, 3 g]: g = 8 if 8 divides N, else 1.

    Rows of 24 values vectorise several times better than rows of 3 (column
    sums, and 1x1 convolutions by a block-diagonal colour matrix).
    """
    num_pixels = tf.shape(x)[0] * tf.shape(x)[1]
    return tf.cond(
        tf.equal(num_pixels % _GROUP, 0),
        lambda: fn(tf.reshape(x, [-1, 3 * _GROUP]), _GROUP),
        lambda: fn(tf.reshape(x, [-1, 3]), 1),
    )


def _channel_sums(x: tf.Tensor) -> tf.Tensor:
    """float64 [3], the sum of each channel of float32 [H, W, 3].

    Column sums in float32, exact on integer images of up to 65793 rows of 8
    pixels (e.g. 512 x 1024); the rest in float64.
    """

    def sums(rows, g):
        cols = tf.cast(tf.reduce_sum(rows, axis=0), tf.float64)
        return tf.reduce_sum(tf.reshape(cols, [g, 3]), axis=0)

    return _grouped(x, sums)


def _colour_matrix(x: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """x @ matrix at every pixel: float32 [H, W, 3], [3, 3] -> [H, W, 3].

    A 1x1 convolution of the rows of g pixels by the block-diagonal
    kron(I_g, matrix); the zero blocks add exact zeros.
    """

    def apply(rows, g):
        blocks = tf.reshape(tf.einsum("ij,ab->iajb", tf.eye(g), matrix), [1, 1, 3 * g, 3 * g])
        out = tf.nn.conv2d(rows[tf.newaxis, :, tf.newaxis], blocks, 1, "VALID")
        return tf.reshape(out, tf.shape(x))

    return _grouped(x, apply)


def _grey_matrix(factor: tf.Tensor) -> tf.Tensor:
    """[3, 3] M with x @ M = factor * x + (1 - factor) * L(x) in each channel, L the luma."""
    return factor * tf.eye(3) + (1.0 - factor) * tf.tile(tf.constant(_L)[:, None], [1, 3])


def _clip_blend(y: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Clips a blend to [0, 255]; for 0 <= factor <= 1 it is convex, already inside."""
    outside = tf.logical_or(factor > 1.0, factor < 0.0)
    return tf.cond(outside, lambda: tf.clip_by_value(y, 0.0, 255.0), lambda: y)


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
    sums = _channel_sums(x)
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
    return _colour_matrix(x, _grey_matrix(tf.constant(0.0)))


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


def _reflect_pad(x: tf.Tensor, rows: tf.Tensor, left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
    """Reflect-pads [H, W, C] by `rows` above and below, `left` and `right` columns.

    One copy (reversed slices) where it can; pads of a side or more (tiny images) reflect
    repeatedly, by gathers.
    """
    height, width = tf.shape(x)[0], tf.shape(x)[1]

    def _pad():
        # Concatenated reversed slices: about half the time of tf.pad's REFLECT
        # (MirrorPad) on a 512 x 1024 image (bench/augment.py).
        y = tf.concat(
            [
                tf.reverse(x[1 : rows + 1], [0]),
                x,
                tf.reverse(x[height - rows - 1 : height - 1], [0]),
            ],
            axis=0,
        )
        return tf.concat(
            [
                tf.reverse(y[:, 1 : left + 1], [1]),
                y,
                tf.reverse(y[:, width - right - 1 : width - 1], [1]),
            ],
            axis=1,
        )

    def _gather():
        y = tf.gather(x, _reflect(tf.range(-rows, height + rows), height))
        return tf.gather(y, _reflect(tf.range(-left, width + right), width), axis=1)

    fits = tf.logical_and(rows < height, tf.maximum(left, right) < width)
    return tf.cond(fits, _pad, _gather)


def _vertical_pass(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """float32 [H + 2 r, W, 3] -> [H, W, 3]: each column convolved with `kernel` [2 r + 1].

    A depthwise convolution whose W * 3 channels are a whole row.
    """
    shape = tf.shape(x)
    out_height = shape[0] - tf.shape(kernel)[0] + 1
    width = shape[1] * shape[2]
    rows = tf.reshape(x, tf.stack([1, shape[0], 1, width]))
    taps = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), tf.stack([1, 1, width, 1]))
    out = tf.nn.depthwise_conv2d(rows, taps, [1, 1, 1, 1], "VALID")
    return tf.reshape(out, tf.stack([out_height, shape[1], shape[2]]))


def _horizontal_pass(x: tf.Tensor, kernel: tf.Tensor, groups: tf.Tensor) -> tf.Tensor:
    """float32 [H, G (groups + 2 D), 3] -> [H, G groups, 3]: rows convolved with `kernel`.

    Groups of G = 8 pixels become 3 G channels; output group g reads input
    groups g .. g + 2 D (D = ceil(r / G)) through a [2 D + 1, 3 G, 3 G] filter.
    """
    g = _GROUP
    height = tf.shape(x)[0]
    r = tf.shape(kernel)[0] // 2
    d = (r + g - 1) // g
    x = tf.reshape(x, tf.stack([1, height, groups + 2 * d, 3 * g]))
    # offset[k, q, p]: input pixel q of group g + k feeds output pixel p of group g.
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
    out = tf.nn.conv2d(x, taps, 1, "VALID")
    return tf.reshape(out, tf.stack([height, groups * g, 3]))


@_no_autograph
def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor | float) -> tf.Tensor:
    """Separable Gaussian blur (`gaussian_kernel`), reflect padding.

    The stand-in for ImageFilter.GaussianBlur(radius=sigma), whose three box
    passes span about 3 sigma too. One reflect pad of both axes (the vertical
    pass commutes with reflecting columns), then the two passes unpadded.
    Weights are positive and sum to 1, so the result needs no clipping.
    """
    kernel = gaussian_kernel(sigma)
    r = tf.shape(kernel)[0] // 2
    width = tf.shape(x)[1]
    d = (r + _GROUP - 1) // _GROUP
    groups = (width + _GROUP - 1) // _GROUP
    x = _reflect_pad(x, r, _GROUP * d, _GROUP * (groups + d) - width)
    x = _horizontal_pass(_vertical_pass(x, kernel), kernel, groups)
    return x[:, :width]


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
    hue: float = HUE,
    sigma_range: Sequence[float] = SIGMA_RANGE,
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
      hue: the hue shift's range, [-hue, hue] (`sample_color_params`).
      sigma_range: (low, high) of the blur's sigma in pixels (`sample_color_params`).
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
    image = apply_color(
        image, sample_color_params(seed=color_seed, hue=hue, sigma_range=sigma_range)
    )
    if not cutout:
        return image, mask, joint.identity_transform()
    cutout_params = randaugment.sample_policy(
        cutout_seed, image_shape=tf.shape(image), num_layers=0, cutout=True
    )
    return randaugment.apply_policy(
        image, mask, cutout_params, fill=fill, cutout_ignore=cutout_ignore, mask_fill=mask_fill
    )
