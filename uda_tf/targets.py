"""The consistency target, per pixel: sharpened softmax, warped, CutMixed.

Pure functions. `consistency_target` computes p~ = softmax(z_ori / T) and the
unsharpened confidence max softmax(z_ori) on the ori view; `warp_to_aug`
brings them into the aug view's frame (the geometric part of RandAugment);
`mix_targets` mixes them between images as CutMix mixed the aug views
(augment/mix.py). `warped_target` does the first two. uda_tf/losses.py turns
the result into the consistency loss.
"""

from collections.abc import Callable

import tensorflow as tf

GlobalConcatFn = Callable[[tf.Tensor], tf.Tensor]

INTERPOLATIONS = ("nearest", "bilinear")


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def valid_or_ones(valid: tf.Tensor | None, like: tf.Tensor) -> tf.Tensor:
    """Bool [N, H, W]: `valid`, or all True shaped as `like` [N, H, W, K]."""
    if valid is None:
        return tf.ones(tf.shape(like)[:-1], tf.bool)
    return tf.cast(valid, tf.bool)


def consistency_target(
    *, ori_logits: tf.Tensor, softmax_temp: float = -1.0
) -> tuple[tf.Tensor, tf.Tensor]:
    """The stop-gradient target p~ and the unsharpened confidence max p.

    Args:
      ori_logits: float [N, H, W, K] logits of the original unlabeled view.
      softmax_temp: T; -1 = no sharpening.

    Returns:
      (target_prob float32 [N, H, W, K] = softmax(z / T),
       confidence float32 [N, H, W] = max softmax(z), T = 1), no gradient.
    """
    ori_logits = tf.stop_gradient(tf.cast(ori_logits, tf.float32))  # [N, H, W, K]
    if softmax_temp == -1:
        target_prob = tf.nn.softmax(ori_logits, axis=-1)  # [N, H, W, K]
        return target_prob, tf.reduce_max(target_prob, axis=-1)
    target_prob = tf.nn.softmax(ori_logits / softmax_temp, axis=-1)  # [N, H, W, K]
    # max softmax(z) = exp(max z - logsumexp z), without a second [N, H, W, K] softmax.
    log_confidence = tf.reduce_max(ori_logits, -1) - tf.reduce_logsumexp(ori_logits, -1)
    return target_prob, tf.exp(log_confidence)  # [N, H, W, K], [N, H, W]


def warped_target(
    *,
    ori_logits: tf.Tensor,
    output_shape: tf.Tensor | tuple[int, int],
    softmax_temp: float = -1.0,
    transforms: tf.Tensor | None = None,
    ori_valid: tf.Tensor | None = None,
    interpolation: str = "nearest",
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The target p~, its confidence and validity in the aug view's frame.

    `consistency_target`, then, with `transforms`, `warp_to_aug` of p~ and
    the confidence together (one warp, so they stay aligned).

    Args:
      ori_logits: float [N, h, w, K] original-view logits.
      output_shape: (H, W) of the aug frame.
      softmax_temp: T; -1 = off.
      transforms: optional float32 [N, 8], the aug view's transform.
      ori_valid: optional [N, h, w] (bool or 0/1), valid ori pixels.
      interpolation: "nearest" or "bilinear" warp of the target.

    Returns:
      (target_prob float32 [N, H, W, K], confidence float32 [N, H, W],
       valid bool [N, H, W]), no gradient; 0 where not valid.
    """
    target_prob, confidence = consistency_target(ori_logits=ori_logits, softmax_temp=softmax_temp)
    if transforms is None:
        return target_prob, confidence, valid_or_ones(ori_valid, target_prob)
    stacked = tf.concat([target_prob, confidence[..., None]], axis=-1)  # [N, h, w, K+1]
    warped, warp_valid = warp_to_aug(
        stacked,
        transforms,
        ori_valid=ori_valid,
        output_shape=output_shape,
        interpolation=interpolation,
    )
    return warped[..., :-1], warped[..., -1], warp_valid  # in the aug frame


def mix_targets(
    *,
    target_prob: tf.Tensor,
    confidence: tf.Tensor,
    valid: tf.Tensor,
    mix_mask: tf.Tensor,
    mix_partner: tf.Tensor,
    global_concat_fn: GlobalConcatFn | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """CutMix of the targets: each pixel gets those of the image it came from.

    p~_mix = box * p~_j + (1 - box) * p~_i with j = mix_partner[i], and the
    same for the confidence and the validity (augment/mix.py mixed the aug
    views with the same box and partner). Call it on targets already in the
    aug frame (`warped_target`): each image's target is warped by its own
    transform, then mixed.

    Args:
      target_prob: float32 [N, H, W, K], this replica's targets.
      confidence: float32 [N, H, W].
      valid: bool [N, H, W].
      mix_mask: [N, H, W] (uint8 or bool), 1 where the pixel is the partner's
        (uda_tf.common.MIX_MASK).
      mix_partner: int [N], the partner's index in the global batch
        (uda_tf.common.MIX_PARTNER).
      global_concat_fn: concatenates a per-replica [N, ...] tensor over the
        replicas, in replica order, into the global batch (`replica_concat`);
        None = one replica.

    Returns:
      The mixed (target_prob, confidence, valid), same shapes and dtypes.
    """
    stacked = tf.concat(
        [target_prob, confidence[..., None], tf.cast(valid, tf.float32)[..., None]], axis=-1
    )  # [N, H, W, K+2]
    stacked = tf.stop_gradient(stacked)
    everyone = (global_concat_fn or _identity)(stacked)  # [N_global, H, W, K+2]
    partner = tf.gather(everyone, tf.cast(mix_partner, tf.int32))  # [N, H, W, K+2]
    box = tf.cast(mix_mask, tf.bool)[..., None]  # [N, H, W, 1]
    mixed = tf.where(box, partner, stacked)
    return mixed[..., :-2], mixed[..., -2], mixed[..., -1] > 0.5


def _round_half_away(x: tf.Tensor) -> tf.Tensor:
    """std::round, as ImageProjectiveTransformV3's nearest mode (not tf.round)."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def _gather_or_fill(flat: tf.Tensor, n_idx, y, x, height, width) -> tf.Tensor:
    """Values of `flat` [N*h*w, C] at integer-valued (n, y, x) [N, H, W]; 0 outside."""
    inside = (y >= 0) & (y <= tf.cast(height - 1, y.dtype)) & (x >= 0)
    inside &= x <= tf.cast(width - 1, x.dtype)
    yi = tf.cast(tf.clip_by_value(y, 0.0, tf.cast(height - 1, y.dtype)), tf.int32)
    xi = tf.cast(tf.clip_by_value(x, 0.0, tf.cast(width - 1, x.dtype)), tf.int32)
    values = tf.gather(flat, (n_idx * height + yi) * width + xi)  # [N, H, W, C]
    return values * tf.cast(inside, flat.dtype)[..., None]


def warp_to_aug(
    ori_probs: tf.Tensor,
    transforms: tf.Tensor,
    *,
    ori_valid: tf.Tensor | None = None,
    output_shape: tf.Tensor | tuple[int, int] | None = None,
    interpolation: str = "nearest",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Brings per-pixel maps of the ori view into the aug view's frame.

    Same convention and sampling as tf.raw_ops.ImageProjectiveTransformV3
    (fill_mode CONSTANT, fill 0): transform [a0, a1, a2, b0, b1, b2, c0, c1]
    maps the aug (output) pixel (x, y) to the ori (input) point
    ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1.
    It is written with gathers so that it also compiles under XLA, which has no
    kernel for that op; tests check it against the op.

    An aug pixel is valid when every ori pixel it reads is inside the frame
    and valid (for "nearest", the one it reads; for "bilinear", all four with
    a non-zero weight).

    Args:
      ori_probs: float [N, h, w, C] maps in the ori frame (probabilities,
        confidences...); warped channels are interpolated independently.
      transforms: float32 [N, 8] or [1, 8].
      ori_valid: optional [N, h, w] (bool or 0/1); None = all valid.
      output_shape: (H, W) of the aug frame; None = (h, w).
      interpolation: "nearest" or "bilinear".

    Returns:
      (warped float32 [N, H, W, C], 0 where invalid; valid bool [N, H, W]).

    Raises:
      ValueError: for an unknown interpolation.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is invalid: expected {INTERPOLATIONS}.")
    ori_probs = tf.cast(ori_probs, tf.float32)  # [N, h, w, C]
    valid = valid_or_ones(ori_valid, ori_probs)  # [N, h, w]
    maps = tf.concat([ori_probs, tf.cast(valid, tf.float32)[..., None]], axis=-1)  # [N,h,w,C+1]
    shape = tf.shape(maps)
    num, height, width = shape[0], shape[1], shape[2]
    out_hw = tf.shape(maps)[1:3] if output_shape is None else output_shape
    out_h, out_w = out_hw[0], out_hw[1]
    transforms = tf.broadcast_to(tf.cast(transforms, tf.float32), [num, 8])
    a0, a1, a2, b0, b1, b2, c0, c1 = [t[:, None, None] for t in tf.unstack(transforms, axis=1)]
    grid_y, grid_x = tf.meshgrid(
        tf.range(out_h, dtype=tf.float32), tf.range(out_w, dtype=tf.float32), indexing="ij"
    )  # [H, W] each
    k = c0 * grid_x + c1 * grid_y + 1.0  # [N, H, W]
    at_infinity = tf.equal(k, 0.0)  # the op fills these pixels
    k = tf.where(at_infinity, tf.ones_like(k), k)
    outside = tf.fill(tf.shape(k), -2.0)
    src_x = tf.where(at_infinity, outside, (a0 * grid_x + a1 * grid_y + a2) / k)  # [N, H, W]
    src_y = tf.where(at_infinity, outside, (b0 * grid_x + b1 * grid_y + b2) / k)  # [N, H, W]
    flat = tf.reshape(maps, [-1, tf.shape(maps)[3]])  # [N*h*w, C+1]
    n_idx = tf.broadcast_to(tf.range(num)[:, None, None], tf.shape(src_x))  # [N, H, W]
    if interpolation == "nearest":
        out = _gather_or_fill(
            flat, n_idx, _round_half_away(src_y), _round_half_away(src_x), height, width
        )
    else:
        y0, x0 = tf.floor(src_y), tf.floor(src_x)
        wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
        out = 0.0
        for dy, dx, weight in (
            (0, 0, (1 - wy) * (1 - wx)),
            (0, 1, (1 - wy) * wx),
            (1, 0, wy * (1 - wx)),
            (1, 1, wy * wx),
        ):
            out += weight * _gather_or_fill(flat, n_idx, y0 + dy, x0 + dx, height, width)
    # A bilinear pixel is valid when its valid weights sum to 1.
    out_valid = out[..., -1] > 1.0 - 1e-4  # [N, H, W]
    warped = out[..., :-1] * tf.cast(out_valid, tf.float32)[..., None]  # [N, H, W, C]
    return warped, out_valid
