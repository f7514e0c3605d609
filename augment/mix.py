"""CutMix between the unlabeled images of a batch (UniMatch's ranges), stateless.

Sample, then apply: `sample_cutmix_params(seed=..., batch_size=..., height=...,
width=...)` draws one box and one partner per image from the batch seed;
`apply_cutmix(batch, params)` is deterministic: the strong (aug) view of image
i shows, inside its box, the aug view of its partner j at the same pixels, and
its own aug view outside. It records which pixels came from the partner
(`common.MIX_MASK`) and who the partner is (`common.MIX_PARTNER`), so that the
train step mixes the consistency targets with exactly the parameters that
mixed the images: target_mix = box * target_j + (1 - box) * target_i, each
image's target warped into its own aug frame first (uda_tf/losses.py).

Distributions (UniMatch `obtain_cutmix_box`, French et al. 2020):
  - each image is mixed with probability `prob` (0.5);
  - box area S uniform in [2 %, 40 %] of the crop;
  - aspect ratio r = h / w uniform in [0.3, 1 / 0.3], restricted to the ratios
    for which the box fits in the crop (UniMatch redraws r until the box fits
    at a random corner; a stateless draw cannot loop, so r is drawn uniformly
    from the part of the range that fits), h = round(sqrt(S r)),
    w = round(sqrt(S / r)), at least 1 pixel, at most the crop;
  - top-left corner uniform over the positions where the whole box fits;
  - partners: a random cyclic permutation of the batch (argsort of uniform
    draws, each image's partner is the next one in that order), so that no
    image is its own partner when the batch has two or more images.

The partner indices are into the batch `apply_cutmix` is given. The data
pipeline mixes the global unlabeled batch (before any split over replicas):
the train step then gathers partner targets over replicas
(`uda_tf.losses.replica_concat`), so that n replicas mix as one does.
"""

import tensorflow as tf

from augment import seeds as seeds_lib
from uda_tf import common

CUTMIX_PROB = 0.5
AREA_RANGE = (0.02, 0.4)  # of the crop's area
ASPECT_RANGE = (0.3, 1.0 / 0.3)  # box height / width


def sample_cutmix_params(
    *,
    seed: tf.Tensor,
    batch_size: tf.Tensor | int,
    height: tf.Tensor | int,
    width: tf.Tensor | int,
    prob: float = CUTMIX_PROB,
) -> dict[str, tf.Tensor]:
    """Draws the boxes and partners of one batch (stateless ops only).

    Args:
      seed: int32/int64 [2], the batch's seed, e.g.
        `augment.seeds.example_seed(cfg.seed, common.MIX_STREAM, batch_index)`.
      batch_size: N, the number of unlabeled images (int or int32 scalar).
      height: crop height h.
      width: crop width w.
      prob: probability that an image is mixed (UniMatch: 0.5).

    Returns:
      {"partner": int32 [N] (image j whose aug view fills image i's box),
       "apply": bool [N] (whether image i is mixed),
       "boxes": int32 [N, 4] (y0, x0, y1, x1), rows y0..y1 - 1 and columns
         x0..x1 - 1, drawn for every image (used only where "apply"),
       "area_fraction": float32 [N], the drawn S / (h w),
       "aspect_ratio": float32 [N], the drawn r}.

    Raises:
      ValueError: `prob` outside [0, 1].
    """
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"sample_cutmix_params: prob={prob!r}, expected a value in [0, 1].")
    apply_seed, area_seed, ratio_seed, pos_seed, perm_seed = seeds_lib.split_seed(seed, 5)
    n = tf.cast(batch_size, tf.int32)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    apply = tf.random.stateless_uniform([n], apply_seed) < prob
    area_fraction = tf.random.stateless_uniform([n], area_seed, *AREA_RANGE)
    area = area_fraction * h * w  # [N] pixels
    # The box fits when sqrt(S / r) <= w and sqrt(S r) <= h: S / w^2 <= r <= h^2 / S.
    lo = tf.maximum(ASPECT_RANGE[0], area / (w * w))
    hi = tf.maximum(tf.minimum(ASPECT_RANGE[1], h * h / area), lo)
    ratio = lo + tf.random.stateless_uniform([n], ratio_seed) * (hi - lo)  # [N]
    box_h = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1.0, h)
    box_w = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1.0, w)
    corner = tf.random.stateless_uniform([n, 2], pos_seed)  # [N, 2] in [0, 1)
    room = tf.stack([h - box_h + 1.0, w - box_w + 1.0], axis=1)  # positions per axis
    y0x0 = tf.minimum(tf.floor(corner * room), room - 1.0)
    y1x1 = y0x0 + tf.stack([box_h, box_w], axis=1)
    boxes = tf.cast(tf.concat([y0x0, y1x1], axis=1), tf.int32)  # [N, 4]
    order = tf.argsort(tf.random.stateless_uniform([n], perm_seed))  # [N]
    rank = tf.argsort(order)  # the position of image i in `order`
    partner = tf.gather(tf.roll(order, shift=-1, axis=0), rank)
    return {
        "partner": tf.cast(partner, tf.int32),
        "apply": apply,
        "boxes": boxes,
        "area_fraction": area_fraction,
        "aspect_ratio": ratio,
    }


def cutmix_mask(params: dict[str, tf.Tensor], height, width) -> tf.Tensor:
    """uint8 [N, h, w]: 1 inside the box of each mixed image, else 0.

    Args:
      params: from `sample_cutmix_params`.
      height: h.
      width: w.
    """
    boxes = params["boxes"]
    rows = tf.range(height, dtype=tf.int32)[None, :, None]  # [1, h, 1]
    cols = tf.range(width, dtype=tf.int32)[None, None, :]  # [1, 1, w]
    y0, x0, y1, x1 = [b[:, None, None] for b in tf.unstack(boxes, axis=1)]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [N, h, w]
    inside &= params["apply"][:, None, None]
    return tf.cast(inside, tf.uint8)


def apply_cutmix(batch: dict[str, tf.Tensor], params: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Mixes the aug views of a batch with the given parameters (deterministic).

    Args:
      batch: a training batch dict with `common.AUG_IMAGE` [N, h, w, C] (any
        dtype); every other key is passed through unchanged.
      params: from `sample_cutmix_params` for this N, h, w.

    Returns:
      A new dict: the batch with AUG_IMAGE mixed, plus
      `common.MIX_MASK` uint8 [N, h, w] (1 where the pixel came from the
      partner) and `common.MIX_PARTNER` int32 [N].
    """
    aug = tf.convert_to_tensor(batch[common.AUG_IMAGE])  # [N, h, w, C]
    shape = tf.shape(aug)
    mask = cutmix_mask(params, shape[1], shape[2])  # [N, h, w]
    partner = tf.cast(params["partner"], tf.int32)  # [N]
    mixed = tf.where(tf.cast(mask, tf.bool)[..., None], tf.gather(aug, partner), aug)
    return {
        **batch,
        common.AUG_IMAGE: mixed,
        common.MIX_MASK: mask,
        common.MIX_PARTNER: partner,
    }


def cutmix_batch(
    batch: dict[str, tf.Tensor], *, seed: tf.Tensor, prob: float = CUTMIX_PROB
) -> dict[str, tf.Tensor]:
    """`apply_cutmix(batch, sample_cutmix_params(...))` for the batch's shape.

    Call after batching, on the whole (global) unlabeled batch, with
    seed = `augment.seeds.example_seed(cfg.seed, common.MIX_STREAM, batch_index)`.

    Args:
      batch: a training batch dict with `common.AUG_IMAGE` [N, h, w, C].
      seed: int32/int64 [2], the batch's seed.
      prob: probability that an image is mixed.

    Returns:
      See `apply_cutmix`.
    """
    shape = tf.shape(batch[common.AUG_IMAGE])
    params = sample_cutmix_params(
        seed=seed, batch_size=shape[0], height=shape[1], width=shape[2], prob=prob
    )
    return apply_cutmix(batch, params)
