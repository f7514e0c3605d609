"""UDA losses, per pixel: TSA-annealed cross-entropy, consistency, entropy.

Pure functions with keyword-only arguments. Shapes: N images, H x W pixels,
K classes. "valid" is a bool mask of the pixels that count.

Every normalised mean is `sum / max(count, 1)`. Under `tf.distribute` both
must be global, so each function takes `global_sum_fn`, applied to the
counts (and to the logged ratios): the returned `loss` is then this replica's
share `local_sum / max(global_count, 1)`. The replicas' shares sum to the
global loss, and since Keras sums gradients over replicas, the gradient is
that of the global loss. Without `global_sum_fn` (one replica) `loss` is the
plain normalised loss. `replica_sum` is the function to pass in a train step.
"""

from collections.abc import Callable

import tensorflow as tf

from uda_tf import config as config_lib

GlobalSumFn = Callable[[tf.Tensor], tf.Tensor]

# The schedules of config.TSA_SCHEDULES ("" = off is handled by the callers).
TSA_SCHEDULES = tuple(s for s in config_lib.TSA_SCHEDULES if s)
INTERPOLATIONS = ("nearest", "bilinear")


def replica_sum(x: tf.Tensor) -> tf.Tensor:
    """Sums `x` over the replicas in sync; the identity on one replica.

    Args:
      x: a tensor computed in a replica context (`strategy.run`, a Keras
        train step). In a cross-replica context it is returned as is.

    Returns:
      The sum of `x` over all replicas (every replica gets the same value).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def _global_counts(global_sum_fn: GlobalSumFn | None, *counts: tf.Tensor) -> list[tf.Tensor]:
    """Sums float scalar counts over replicas in one call; stop-gradient."""
    stacked = tf.stack([tf.cast(c, tf.float32) for c in counts])  # [C]
    return tf.unstack(tf.stop_gradient((global_sum_fn or _identity)(stacked)))


def _valid_or_ones(valid: tf.Tensor | None, like: tf.Tensor) -> tf.Tensor:
    """Bool [N, H, W]: `valid`, or all True shaped as `like` [N, H, W, K]."""
    if valid is None:
        return tf.ones(tf.shape(like)[:-1], tf.bool)
    return tf.cast(valid, tf.bool)


def tsa_threshold(*, schedule: str, progress: tf.Tensor | float, num_classes: int) -> tf.Tensor:
    """The TSA threshold eta = c(t) * (1 - 1/K) + 1/K.

    Mirrors image/main.py:get_tsa_threshold (start 1/K, end 1, no clipping of
    the progress t): linear c = t, exp c = exp(5 (t - 1)), log c = 1 - exp(-5 t).

    Args:
      schedule: one of "linear_schedule", "log_schedule", "exp_schedule".
      progress: float scalar t = step / train_steps.
      num_classes: K.

    Returns:
      float32 scalar eta.

    Raises:
      ValueError: for an unknown schedule.
    """
    t = tf.cast(progress, tf.float32)
    if schedule == "linear_schedule":
        coeff = t
    elif schedule == "exp_schedule":
        coeff = tf.exp((t - 1.0) * 5.0)
    elif schedule == "log_schedule":
        coeff = 1.0 - tf.exp(-t * 5.0)
    else:
        raise ValueError(f"--tsa={schedule!r} is invalid: expected one of {TSA_SCHEDULES}.")
    start = 1.0 / num_classes
    return coeff * (1.0 - start) + start


def supervised_loss(
    *,
    logits: tf.Tensor,
    labels: tf.Tensor,
    num_classes: int,
    ignore_label: int = 255,
    tsa: str = "",
    progress: tf.Tensor | float | None = None,
    global_sum_fn: GlobalSumFn | None = None,
) -> dict[str, tf.Tensor]:
    """Per-pixel cross-entropy with Training Signal Annealing.

    Mirrors image/main.py:anneal_sup_loss. A valid pixel (label != ignore) is
    kept unless p(label) > eta (strict); the mask is stop-gradient. The loss is
    sum(kept * CE) / max(sum(kept), 1); without TSA every valid pixel is kept,
    which is the mean CE over valid pixels. Ignored pixels count in neither sum.

    Args:
      logits: float [N, H, W, K].
      labels: int [N, H, W] class ids, `ignore_label` where unlabeled.
      num_classes: K.
      ignore_label: the label of pixels to leave out.
      tsa: "" (off) or a schedule of `tsa_threshold`.
      progress: float scalar step / train_steps; required when `tsa` is set.
      global_sum_fn: sums a count over replicas (see the module docstring).

    Returns:
      dict with float32 scalars: `loss` (this replica's share of L_sup),
      `threshold` (eta; 1 without TSA), `trained_ratio` (kept / valid,
      global), `num_kept`, `num_valid` (global counts).

    Raises:
      ValueError: if `tsa` is set without `progress`, or K mismatches logits.
    """
    if logits.shape[-1] is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, --num_classes={num_classes}.")
    logits = tf.cast(logits, tf.float32)  # [N, H, W, K]
    labels = tf.cast(labels, tf.int32)  # [N, H, W]
    valid = tf.not_equal(labels, ignore_label)  # [N, H, W]
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))  # [N, H, W]
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    if tsa:
        if progress is None:
            raise ValueError(f"--tsa={tsa!r} needs the training progress.")
        threshold = tsa_threshold(schedule=tsa, progress=progress, num_classes=num_classes)
        correct_prob = tf.exp(-ce)  # [N, H, W] p(label)
        kept = tf.logical_and(valid, tf.logical_not(correct_prob > threshold))
    else:
        threshold = tf.constant(1.0)
        kept = valid
    kept_mask = tf.stop_gradient(tf.cast(kept, tf.float32))  # [N, H, W]
    num_kept, num_valid = _global_counts(
        global_sum_fn, tf.reduce_sum(kept_mask), tf.reduce_sum(tf.cast(valid, tf.float32))
    )
    return {
        "loss": tf.reduce_sum(kept_mask * ce) / tf.maximum(num_kept, 1.0),
        "threshold": threshold,
        "trained_ratio": num_kept / tf.maximum(num_valid, 1.0),
        "num_kept": num_kept,
        "num_valid": num_valid,
    }


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


def consistency_loss(
    *,
    ori_logits: tf.Tensor,
    aug_logits: tf.Tensor,
    valid: tf.Tensor | None = None,
    softmax_temp: float = -1.0,
    confidence_thresh: float = -1.0,
    transforms: tf.Tensor | None = None,
    ori_valid: tf.Tensor | None = None,
    interpolation: str = "nearest",
    global_sum_fn: GlobalSumFn | None = None,
) -> dict[str, tf.Tensor]:
    """KL(p~ || softmax(z_aug)) per pixel, confidence-masked, warped.

    Mirrors image/main.py:_kl_divergence_with_logits and its confidence mask.
    The target p~ = softmax(z_ori / T) is stop-gradient; the aug logits are
    never divided by T. M = 1 where max softmax(z_ori) (T = 1) > thresh. With
    `transforms`, p~ and the confidence are warped into the aug frame first
    (`warp_to_aug`), and M is taken there; pixels from outside the ori frame or
    from invalid ori pixels are invalid. The loss is sum(valid * M * KL) /
    max(sum(valid), 1): masked pixels count as zeros in the mean.

    Args:
      ori_logits: float [N, h, w, K] original-view logits.
      aug_logits: float [N, H, W, K] augmented-view logits.
      valid: optional bool [N, H, W], pixels of the aug frame that count.
      softmax_temp: T; -1 = off.
      confidence_thresh: threshold on the unsharpened max prob; -1 = off.
      transforms: optional float32 [N, 8], the aug view's transform (maps an
        aug pixel to the ori pixel it came from; uda_tf.common.AUG_TRANSFORM).
      ori_valid: optional [N, h, w] (bool or 0/1), valid ori pixels.
      interpolation: "nearest" or "bilinear" warp of the target.
      global_sum_fn: sums a count over replicas (see the module docstring).

    Returns:
      dict with float32 scalars `loss` (this replica's share of L_cons),
      `high_prob_ratio` (sum(valid * M) / sum(valid), global), `num_valid`.
    """
    target_prob, confidence = consistency_target(ori_logits=ori_logits, softmax_temp=softmax_temp)
    if transforms is not None:
        stacked = tf.concat([target_prob, confidence[..., None]], axis=-1)  # [N, h, w, K+1]
        warped, warp_valid = warp_to_aug(
            stacked,
            transforms,
            ori_valid=ori_valid,
            output_shape=tf.shape(aug_logits)[1:3],
            interpolation=interpolation,
        )
        target_prob, confidence = warped[..., :-1], warped[..., -1]  # in the aug frame
        frame_valid = warp_valid  # [N, H, W]
    else:
        frame_valid = _valid_or_ones(ori_valid, target_prob)
    frame_valid = tf.logical_and(frame_valid, _valid_or_ones(valid, aug_logits))
    valid_mask = tf.cast(frame_valid, tf.float32)  # [N, H, W]
    if confidence_thresh != -1:
        conf_mask = tf.cast(confidence > confidence_thresh, tf.float32)  # [N, H, W]
    else:
        conf_mask = tf.ones_like(valid_mask)
    log_q = tf.nn.log_softmax(tf.cast(aug_logits, tf.float32), axis=-1)  # [N, H, W, K]
    kl = tf.reduce_sum(tf.math.xlogy(target_prob, target_prob) - target_prob * log_q, axis=-1)
    num_valid, num_high = _global_counts(
        global_sum_fn, tf.reduce_sum(valid_mask), tf.reduce_sum(valid_mask * conf_mask)
    )
    return {
        "loss": tf.reduce_sum(valid_mask * conf_mask * kl) / tf.maximum(num_valid, 1.0),
        "high_prob_ratio": num_high / tf.maximum(num_valid, 1.0),
        "num_valid": num_valid,
    }


def entropy_loss(
    *,
    logits: tf.Tensor,
    valid: tf.Tensor | None = None,
    global_sum_fn: GlobalSumFn | None = None,
) -> dict[str, tf.Tensor]:
    """Mean entropy of softmax(logits) over valid pixels, with gradient.

    Mirrors image/main.py:get_ent (on the original unlabeled logits,
    unsharpened and unmasked).

    Args:
      logits: float [N, H, W, K].
      valid: optional [N, H, W] (bool or 0/1), pixels that count.
      global_sum_fn: sums a count over replicas (see the module docstring).

    Returns:
      dict with float32 scalars `loss` (this replica's share) and `num_valid`.
    """
    log_prob = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)  # [N, H, W, K]
    entropy = -tf.reduce_sum(tf.exp(log_prob) * log_prob, axis=-1)  # [N, H, W]
    valid_mask = tf.cast(_valid_or_ones(valid, log_prob), tf.float32)  # [N, H, W]
    (num_valid,) = _global_counts(global_sum_fn, tf.reduce_sum(valid_mask))
    return {
        "loss": tf.reduce_sum(valid_mask * entropy) / tf.maximum(num_valid, 1.0),
        "num_valid": num_valid,
    }


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
    valid = _valid_or_ones(ori_valid, ori_probs)  # [N, h, w]
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
