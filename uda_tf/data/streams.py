"""tf.data streams for training and evaluation (batch format: uda_tf/common.py).

Training, per step, one dict: the labeled stream (IMAGE, MASK; batch B) and,
with unsup_ratio r > 0, the unlabeled stream (ORI_IMAGE, ORI_VALID,
AUG_IMAGE, AUG_TRANSFORM; batch r*B), zipped.

Per labeled example: random scale in [min_scale, max_scale] -> pad to the
crop (image: the mean colour, mask: ignore) -> random crop -> random
horizontal flip, image and mask with ONE parameter set; optionally RandAugment
jointly. Per unlabeled example: the same steps give the ori view, and UDA's
RandAugment + Cutout of it the aug view, with its transform.

Scale, pad, crop and flip are one resampling (`apply_crop`), computed at the
crop's size only. Per axis, with s drawn once: if the scaled image
(round(L*s)) covers the crop, a window of round(crop/s) source pixels at a
random offset is resized to the crop; otherwise the whole axis is resized to
round(L*s) and placed at a random offset in the crop, the rest being
padding. Images are resized bilinearly, masks by nearest neighbour (both as
tf.image.resize, half-pixel centres), and labels are mapped to class ids
after cropping (a 512x1024 crop has 4x fewer pixels than a 1024x2048 frame).

Randomness is stateless: `ds.shuffle(n, seed).repeat().enumerate()`, and
example i of stream s gets the seed `augment.seeds.example_seed(seed, s, i)`,
split into named streams. The same config gives the same batches.
"""

from collections.abc import Sequence

import tensorflow as tf

from augment import color, mix, randaugment, seeds
from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import service, sources

AUTOTUNE = tf.data.AUTOTUNE


def sample_crop_params(
    image_size: tf.Tensor,
    *,
    seed: tf.Tensor,
    crop_size: Sequence[int],
    min_scale: float,
    max_scale: float,
) -> dict[str, tf.Tensor]:
    """Draws one scale/crop/flip parameter set (per axis, see the module docstring).

    Args:
      image_size: int32 [2], (H, W) of the image.
      seed: int [2], the example's crop seed.
      crop_size: (crop_height, crop_width).
      min_scale, max_scale: range of the uniform scale factor s.

    Returns:
      int32 [2] tensors "src_offset", "src_size" (the source window),
      "out_size" (its size once scaled), "dst_offset" (its place in the
      crop), and bool [] "flip".
    """
    scale_seed, y_seed, x_seed, flip_seed = seeds.split_seed(seed, 4)
    scale = tf.random.stateless_uniform([], scale_seed, min_scale, max_scale)
    size = tf.cast(image_size, tf.int32)
    crop = tf.constant(crop_size, tf.int32)
    scaled = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
    fits = scaled >= crop  # Window mode: the crop lies inside the scaled image.
    window = tf.cast(tf.round(tf.cast(crop, tf.float32) / scale), tf.int32)
    src_size = tf.where(fits, tf.clip_by_value(window, 1, size), size)
    out_size = tf.where(fits, crop, scaled)
    slack = tf.where(fits, size - src_size, crop - out_size)
    offset = tf.stack(
        [
            tf.random.stateless_uniform([], y_seed, 0, slack[0] + 1, tf.int32),
            tf.random.stateless_uniform([], x_seed, 0, slack[1] + 1, tf.int32),
        ]
    )
    zero = tf.zeros_like(offset)
    return {
        "src_offset": tf.where(fits, offset, zero),
        "src_size": src_size,
        "out_size": out_size,
        "dst_offset": tf.where(fits, zero, offset),
        "flip": tf.random.stateless_uniform([], flip_seed) < 0.5,
    }


def crop_valid(params: dict, crop_size: Sequence[int]) -> tf.Tensor:
    """bool [crop_h, crop_w]: True where the crop pixel comes from the image, not padding."""
    rows = tf.range(crop_size[0]) - params["dst_offset"][0]
    cols = tf.range(crop_size[1])
    cols = tf.where(params["flip"], crop_size[1] - 1 - cols, cols) - params["dst_offset"][1]
    valid_rows = (rows >= 0) & (rows < params["out_size"][0])
    valid_cols = (cols >= 0) & (cols < params["out_size"][1])
    return valid_rows[:, None] & valid_cols[None, :]


def _nearest_index(params: dict, axis: int, crop_len: int) -> tf.Tensor:
    """Source index of each (unflipped) crop row/column, half-pixel nearest."""
    k = tf.cast(tf.range(crop_len) - params["dst_offset"][axis], tf.float32)
    src, out = params["src_size"][axis], params["out_size"][axis]
    ratio = tf.cast(src, tf.float32) / tf.cast(out, tf.float32)
    index = tf.cast(tf.floor((k + 0.5) * ratio), tf.int32)
    return params["src_offset"][axis] + tf.clip_by_value(index, 0, src - 1)


def _fill_padding(x: tf.Tensor, params: dict, crop_size: Sequence[int], fill: tf.Tensor):
    """`x` [crop_h, crop_w, C] (unflipped) with `fill` outside the resized window."""
    rows = tf.range(crop_size[0]) - params["dst_offset"][0]
    cols = tf.range(crop_size[1]) - params["dst_offset"][1]
    valid = ((rows >= 0) & (rows < params["out_size"][0]))[:, None] & (
        (cols >= 0) & (cols < params["out_size"][1])
    )[None, :]
    return tf.where(valid[:, :, None], x, fill)


def apply_crop(
    x: tf.Tensor,
    params: dict,
    *,
    crop_size: Sequence[int],
    interpolation: str,
    fill: Sequence[int] | int,
) -> tf.Tensor:
    """Scale, pad, crop and flip `x` by `params` (deterministic).

    The source window is resized to out_size as tf.image.resize does
    (half-pixel centres; bilinear, or nearest with exact values), placed at
    dst_offset in the crop, the rest filled with `fill`, then flipped.

    Args:
      x: [H, W, C] uint8 (an image, or a mask with C = 1).
      params: from `sample_crop_params`.
      crop_size: (crop_height, crop_width).
      interpolation: "bilinear" (images) or "nearest" (masks).
      fill: value of padding pixels, per channel or one for all.

    Returns:
      [crop_h, crop_w, C], the dtype of `x`.
    """
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}.")
    dtype, channels = x.dtype, x.shape[-1]
    crop = tf.constant(crop_size, tf.int32)
    if interpolation == "nearest":
        rows = _nearest_index(params, 0, crop_size[0])
        cols = _nearest_index(params, 1, crop_size[1])
        cols = tf.cond(params["flip"], lambda: tf.reverse(cols, [0]), lambda: cols)
        out = tf.gather(tf.gather(x, rows), cols, axis=1)
        flip = False  # Done by the column order; padding below is then mirrored.
    else:
        begin = tf.concat([params["src_offset"], [0]], 0)
        window = tf.slice(x, begin, tf.concat([params["src_size"], [-1]], 0))
        out = tf.raw_ops.ResizeBilinear(
            images=window[None], size=params["out_size"], half_pixel_centers=True
        )[0]
        out = tf.cast(out + 0.5, dtype)  # Rounds: bilinear values stay in range.
        before = params["dst_offset"]
        after = crop - params["out_size"] - before
        out = tf.pad(out, tf.concat([tf.stack([before, after], axis=1), [[0, 0]]], 0))
        flip = True
    fill = tf.cast(tf.broadcast_to(tf.constant(fill), [channels]), dtype)
    padded = tf.reduce_any(params["out_size"] < crop)
    if flip:
        out = tf.cond(padded, lambda: _fill_padding(out, params, crop_size, fill), lambda: out)
        out = tf.cond(params["flip"], lambda: tf.reverse(out, [1]), lambda: out)
    else:
        valid = crop_valid(params, crop_size)[:, :, None]
        out = tf.cond(padded, lambda: tf.where(valid, out, fill), lambda: out)
    return tf.ensure_shape(out, [crop_size[0], crop_size[1], channels])


def randaugment_distort(
    image: tf.Tensor, mask: tf.Tensor | None, *, seed: tf.Tensor, cfg: config_lib.DataConfig
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """UDA's RandAugment + Cutout with the config's policy: (image, mask, transform [8])."""
    return randaugment.distort(
        image,
        mask,
        seed=seed,
        num_layers=cfg.aug_num_layers,
        prob=cfg.aug_prob,
        cutout=cfg.aug_cutout,
        ops=cfg.aug_ops,
    )


def strong_view(
    image: tf.Tensor, *, seed: tf.Tensor, cfg: config_lib.DataConfig
) -> tuple[tf.Tensor, None, tf.Tensor]:
    """The aug view of --aug_policy: (image uint8 [h, w, 3], None, transform [8]).

    "randaugment": UDA's 15 ops + Cutout (geometric ops move the view, and the
    transform says how); "color": UniMatch's colour jitter, greyscale and blur
    (+ Cutout with --aug_cutout), with the identity transform.
    """
    if cfg.aug_policy == "color":
        return color.color_view(
            image,
            None,
            seed=seed,
            cutout=cfg.aug_cutout,
            hue=cfg.aug_color_hue,
            sigma_range=(config_lib.COLOR_MIN_SIGMA, cfg.aug_color_max_sigma),
        )
    return randaugment_distort(image, None, seed=seed, cfg=cfg)


def mix_batches(ds: tf.data.Dataset, cfg: config_lib.DataConfig, start_step: int = 0):
    """CutMix (--unsup_mix=cutmix) of each batch's aug views, seeded per batch.

    The batch of step s is mixed with seed fold_in([seed, MIX_STREAM], s), so
    a resumed run mixes its batches as the uninterrupted run did.
    """
    if cfg.unsup_mix == "none":
        return ds

    def mix_fn(step, batch):
        return mix.cutmix_batch(batch, seed=seeds.example_seed(cfg.seed, common.MIX_STREAM, step))

    # A range, not ds.enumerate(): the tf.data service's DYNAMIC sharding splits
    # a range over its workers (each step seed used once), not enumerate's counter.
    steps = tf.data.Dataset.range(start_step, service.MAX_EPOCHS)
    return tf.data.Dataset.zip(steps, ds).map(mix_fn, num_parallel_calls=AUTOTUNE)


def _crop_params(image: tf.Tensor, seed: tf.Tensor, cfg: config_lib.DataConfig) -> dict:
    return sample_crop_params(
        tf.shape(image)[:2],
        seed=seed,
        crop_size=(cfg.crop_height, cfg.crop_width),
        min_scale=cfg.min_scale,
        max_scale=cfg.max_scale,
    )


def labeled_crop(
    element: dict[str, tf.Tensor],
    *,
    seed: tf.Tensor,
    cfg: config_lib.DataConfig,
    label_table: Sequence[int] | None = None,
    image_interpolation: str = "bilinear",
) -> dict[str, tf.Tensor]:
    """One labeled training example.

    Args:
      element: {IMAGE uint8 [H, W, 3], MASK uint8 [H, W]}.
      seed: int [2], the example's seed.
      cfg: the data config (crop, scales, ignore_label, sup_randaugment).
      label_table: if given, MASK holds stored label values, mapped by this
        256-entry table after cropping (its entry 255 must be the ignore label).
      image_interpolation: "bilinear", or "nearest" (for alignment tests).

    Returns:
      {IMAGE uint8 [crop_h, crop_w, 3], MASK uint8 [crop_h, crop_w]}.
    """
    crop_seed, aug_seed = seeds.split_seed(seed, 2)
    image, mask = element[common.IMAGE], element[common.MASK]
    params = _crop_params(image, crop_seed, cfg)
    size = (cfg.crop_height, cfg.crop_width)
    image = apply_crop(
        image, params, crop_size=size, interpolation=image_interpolation, fill=common.MEAN_RGB_UINT8
    )
    mask_fill = 255 if label_table is not None else cfg.ignore_label
    mask = apply_crop(
        mask[:, :, None], params, crop_size=size, interpolation="nearest", fill=mask_fill
    )
    mask = mask[:, :, 0]
    if label_table is not None:
        mask = tf.gather(tf.constant(label_table, tf.uint8), tf.cast(mask, tf.int32))
    if cfg.sup_randaugment:
        image, mask, _ = randaugment_distort(image, mask, seed=aug_seed, cfg=cfg)
    return {common.IMAGE: image, common.MASK: mask}


def unlabeled_views(
    element: dict[str, tf.Tensor], *, seed: tf.Tensor, cfg: config_lib.DataConfig
) -> dict[str, tf.Tensor]:
    """One unlabeled example: ori view, its valid pixels, aug view and its transform.

    Returns:
      {ORI_IMAGE uint8 [h, w, 3], ORI_VALID uint8 [h, w], AUG_IMAGE uint8
      [h, w, 3], AUG_TRANSFORM float32 [8]} (h, w = the crop size).
    """
    crop_seed, aug_seed = seeds.split_seed(seed, 2)
    image = element[common.IMAGE]
    params = _crop_params(image, crop_seed, cfg)
    size = (cfg.crop_height, cfg.crop_width)
    ori = apply_crop(
        image, params, crop_size=size, interpolation="bilinear", fill=common.MEAN_RGB_UINT8
    )
    valid = tf.cast(crop_valid(params, size), tf.uint8)
    aug, _, transform = strong_view(ori, seed=aug_seed, cfg=cfg)
    return {
        common.ORI_IMAGE: ori,
        common.ORI_VALID: valid,
        common.AUG_IMAGE: aug,
        common.AUG_TRANSFORM: tf.cast(transform, tf.float32),
    }


def resize_element(element: dict[str, tf.Tensor], factor: float) -> dict[str, tf.Tensor]:
    """Resizes IMAGE (bilinear, antialiased) and MASK (nearest) by `factor`.

    Args:
      element: {IMAGE uint8 [H, W, 3], optional MASK uint8 [H, W], ...}.
      factor: the scale; 1.0 returns `element` unchanged.

    Returns:
      The element with IMAGE uint8 [round(H f), round(W f), 3] and MASK
      uint8 [round(H f), round(W f)] (labels kept exactly).
    """
    if factor == 1.0:
        return element
    image = element[common.IMAGE]
    size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * factor), tf.int32)
    out = dict(element)
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    out[common.IMAGE] = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    if common.MASK in element:
        mask = tf.image.resize(element[common.MASK][:, :, None], size, method="nearest")
        out[common.MASK] = tf.cast(mask[:, :, 0], element[common.MASK].dtype)
    return out


def _stream(
    source: sources.Source,
    cfg: config_lib.DataConfig,
    stream_id: int,
    fn,
    *,
    splittable: bool = False,
    start_index: int = 0,
    **kwargs,
):
    """Shuffled, repeated, enumerated, decoded and mapped examples of one stream.

    From example `start_index` on: the ones before are skipped before they
    are decoded (a shuffle with a seed draws each epoch's order from the seed
    alone, so the skipped stream is the tail of the whole one, indices too).
    """
    # Each stream shuffles with its own seed, so that the labeled and the
    # unlabeled streams do not visit the same images in the same order.
    shuffle_seed = cfg.seed * 1009 + stream_id
    if splittable:  # The same (index, raw) pairs, one tf.data service split per epoch.
        ds = service.splittable_order(source, shuffle_seed=shuffle_seed, start_index=start_index)
    else:
        ds = source.raw.shuffle(source.shuffle_buffer, seed=shuffle_seed).repeat()
        ds = ds.skip(start_index).enumerate(start=start_index)
    decode = source.decode_raw if kwargs.get("label_table") is not None else source.decode

    def map_fn(index, raw):
        seed = seeds.example_seed(cfg.seed, stream_id, index)
        return fn(resize_element(decode(raw), cfg.resize_factor), seed=seed, cfg=cfg, **kwargs)

    return ds.map(map_fn, num_parallel_calls=AUTOTUNE, deterministic=True)


def train_dataset(
    cfg: config_lib.DataConfig, *, splittable: bool = False, start_step: int = 0
) -> tf.data.Dataset:
    """The training stream: one batch dict per step, endless (see module docstring).

    Args:
      cfg: the data config.
      splittable: for the tf.data service (uda_tf/data/service.py): every
        epoch gives the same examples and seeds, from a source that DYNAMIC
        sharding splits by epoch.
      start_step: the first batch is that of this step (a resumed run): the
        labeled stream starts at example start_step * B, the unlabeled one
        at start_step * r * B, without decoding the ones skipped.

    Raises:
      ValueError: bad flags or bad input files (naming them), before training.
    """
    sources.check_num_classes(cfg)
    sup_source = sources.labeled_source(cfg, "train")
    sup = _stream(
        sup_source,
        cfg,
        common.SUP_STREAM,
        labeled_crop,
        label_table=sup_source.label_table,
        splittable=splittable,
        start_index=start_step * cfg.train_batch_size,
    )
    sup = sup.batch(cfg.train_batch_size, drop_remainder=True)
    if cfg.unsup_ratio == 0:
        return sup.prefetch(AUTOTUNE)
    unsup_source = sources.unlabeled_source(cfg)
    unsup_batch = cfg.unsup_ratio * cfg.train_batch_size
    unsup = _stream(
        unsup_source,
        cfg,
        common.UNSUP_STREAM,
        unlabeled_views,
        splittable=splittable,
        start_index=start_step * unsup_batch,
    )
    unsup = unsup.batch(unsup_batch, drop_remainder=True)
    ds = tf.data.Dataset.zip(sup, unsup).map(lambda a, b: {**a, **b})
    return mix_batches(ds, cfg, start_step).prefetch(AUTOTUNE)


def eval_element(
    element: dict[str, tf.Tensor], factor: float, *, at_stored_size: bool
) -> dict[str, tf.Tensor]:
    """One evaluation example: the network's input at `factor`, the labels to score.

    Args:
      element: {IMAGE uint8 [H, W, 3], MASK uint8 [H, W], FILENAME}.
      factor: --resize_factor, the scale the network trains at.
      at_stored_size: keep MASK at its stored size [H, W] (predictions are
        resized to it before scoring) and the stored image as STORED_IMAGE
        (for pictures); False resizes MASK with IMAGE (nearest), and the
        score is that of the smaller task.

    Returns:
      {IMAGE uint8 [round(H f), round(W f), 3], MASK, FILENAME} and, with
      at_stored_size and f != 1, STORED_IMAGE uint8 [H, W, 3].
    """
    if factor == 1.0:
        return element
    if not at_stored_size:
        return resize_element(element, factor)
    out = resize_element({common.IMAGE: element[common.IMAGE]}, factor)
    out[common.STORED_IMAGE] = element[common.IMAGE]
    return {**element, **out}


def eval_dataset(cfg: config_lib.DataConfig, split: str = "val") -> tf.data.Dataset:
    """Labeled examples of `split` scored at their stored size, in a fixed order, once.

    The network's input is resized by --resize_factor as in training; the
    labels stay at their stored size unless --eval_at_stored_size=false
    (`eval_element`).

    Returns:
      batches of {IMAGE uint8 [b, h, w, 3], MASK uint8 [b, H, W], FILENAME
      string [b]} (h, w = H, W scaled by --resize_factor; H, W too with
      --eval_at_stored_size=false) and, when they differ, STORED_IMAGE uint8
      [b, H, W, 3]; b <= eval_batch_size (the last batch may be smaller).
      Images of different sizes are padded to the largest of their batch
      (image with 0, mask with the ignore label).
    """
    sources.check_num_classes(cfg)
    ds = sources.labeled_source(cfg, split).elements()
    if cfg.resize_factor != 1.0:
        ds = ds.map(
            lambda e: eval_element(e, cfg.resize_factor, at_stored_size=cfg.eval_at_stored_size),
            num_parallel_calls=AUTOTUNE,
        )
    padding = {
        common.IMAGE: tf.constant(0, tf.uint8),
        common.MASK: tf.constant(cfg.ignore_label, tf.uint8),
        common.FILENAME: tf.constant(""),
    }
    if common.STORED_IMAGE in ds.element_spec:
        padding[common.STORED_IMAGE] = tf.constant(0, tf.uint8)
    return ds.padded_batch(cfg.eval_batch_size, padding_values=padding).prefetch(AUTOTUNE)
