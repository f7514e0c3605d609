"""UDA losses, per pixel: TSA-annealed cross-entropy, consistency, entropy.

Pure functions with keyword-only arguments. Shapes: N images, H x W pixels,
K classes. "valid" is a bool mask of the pixels that count.

Every normalised mean is `sum / max(count, 1)`. Under `tf.distribute` both
must be global, so each function takes `global_sum_fn`, applied to the
counts (and to the logged ratios): the returned `loss` is then this replica's
share `local_sum / max(global_count, 1)`. The replicas' shares sum to the
global loss, and since Keras sums gradients over replicas, the gradient is
that of the global loss. Without `global_sum_fn` (one replica) `loss` is the
plain normalised loss. `replica_sum` is the function to pass in a train step
(and `replica_concat` as `global_concat_fn`, which CutMix needs to find a
partner's target on another replica). The target itself (sharpening, warp,
CutMix) is built in uda_tf/targets.py.
"""

from collections.abc import Callable

import tensorflow as tf

from uda_tf import config as config_lib
from uda_tf import targets
from uda_tf.targets import (  # noqa: F401 (public here too, as before)
    INTERPOLATIONS,
    GlobalConcatFn,
    consistency_target,
    mix_targets,
    warp_to_aug,
    warped_target,
)

GlobalSumFn = Callable[[tf.Tensor], tf.Tensor]

# The schedules of config.TSA_SCHEDULES ("" = off is handled by the callers).
TSA_SCHEDULES = tuple(s for s in config_lib.TSA_SCHEDULES if s)
UDA_LOSSES = config_lib.UDA_LOSSES


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


def replica_concat(x: tf.Tensor) -> tf.Tensor:
    """Concatenates `x` [n, ...] over the replicas in sync, in replica order.

    The global batch back from its replica parts (uda_tf.train splits it so);
    the identity on one replica. Used to find CutMix partners on another
    replica.

    Args:
      x: [n, ...], computed in a replica context.

    Returns:
      [n * num_replicas, ...], the same on every replica.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=0)


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def _global_counts(global_sum_fn: GlobalSumFn | None, *counts: tf.Tensor) -> list[tf.Tensor]:
    """Sums float scalar counts over replicas in one call; stop-gradient."""
    stacked = tf.stack([tf.cast(c, tf.float32) for c in counts])  # [C]
    return tf.unstack(tf.stop_gradient((global_sum_fn or _identity)(stacked)))


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
    uda_loss: str = "kl",
    mix_mask: tf.Tensor | None = None,
    mix_partner: tf.Tensor | None = None,
    global_sum_fn: GlobalSumFn | None = None,
    global_concat_fn: GlobalConcatFn | None = None,
) -> dict[str, tf.Tensor]:
    """KL(p~ || softmax(z_aug)) (or CE to argmax p~) per pixel, masked, warped.

    Mirrors image/main.py:_kl_divergence_with_logits and its confidence mask.
    The target p~ = softmax(z_ori / T) is stop-gradient; the aug logits are
    never divided by T. M = 1 where max softmax(z_ori) (T = 1) > thresh. With
    `transforms`, p~ and the confidence are warped into the aug frame first
    (`warp_to_aug`), and M is taken there; pixels from outside the ori frame or
    from invalid ori pixels are invalid. With `mix_mask`, the warped targets,
    confidences and validities are then mixed as the aug views were
    (`mix_targets`). The loss is sum(valid * M * D) / max(sum(valid), 1):
    masked pixels count as zeros in the mean.

    uda_loss "kl": D = KL(p~ || q), the original. "ce" (FixMatch / UniMatch
    hard targets): D = -log q(argmax p~), p~ unsharpened (T must be -1; the
    argmax of a warped, bilinear target is that of the interpolated
    probabilities), with the same M and the same denominator.

    Args:
      ori_logits: float [N, h, w, K] original-view logits.
      aug_logits: float [N, H, W, K] augmented-view logits.
      valid: optional bool [N, H, W], pixels of the (mixed) aug frame that count.
      softmax_temp: T; -1 = off.
      confidence_thresh: threshold on the unsharpened max prob; -1 = off.
      transforms: optional float32 [N, 8], the aug view's transform (maps an
        aug pixel to the ori pixel it came from; uda_tf.common.AUG_TRANSFORM).
      ori_valid: optional [N, h, w] (bool or 0/1), valid ori pixels.
      interpolation: "nearest" or "bilinear" warp of the target.
      uda_loss: "kl" or "ce".
      mix_mask: optional [N, H, W] uint8/bool, uda_tf.common.MIX_MASK.
      mix_partner: int [N], uda_tf.common.MIX_PARTNER; required with mix_mask.
      global_sum_fn: sums a count over replicas (see the module docstring).
      global_concat_fn: gathers the targets over replicas for `mix_targets`.

    Returns:
      dict with float32 scalars `loss` (this replica's share of L_cons),
      `high_prob_ratio` (sum(valid * M) / sum(valid), global), `num_valid`.

    Raises:
      ValueError: an unknown uda_loss, "ce" with a temperature, or a
        mix_mask without mix_partner.
    """
    if uda_loss not in UDA_LOSSES:
        raise ValueError(f"--uda_loss={uda_loss!r} is invalid: expected one of {UDA_LOSSES}.")
    if uda_loss == "ce" and softmax_temp != -1:
        raise ValueError(f"--uda_loss=ce takes no --uda_softmax_temp (got {softmax_temp}).")
    target_prob, confidence, frame_valid = warped_target(
        ori_logits=ori_logits,
        output_shape=tf.shape(aug_logits)[1:3],
        softmax_temp=softmax_temp,
        transforms=transforms,
        ori_valid=ori_valid,
        interpolation=interpolation,
    )
    if mix_mask is not None:
        if mix_partner is None:
            raise ValueError("consistency_loss: mix_mask needs mix_partner.")
        target_prob, confidence, frame_valid = mix_targets(
            target_prob=target_prob,
            confidence=confidence,
            valid=frame_valid,
            mix_mask=mix_mask,
            mix_partner=mix_partner,
            global_concat_fn=global_concat_fn,
        )
    frame_valid = tf.logical_and(frame_valid, targets.valid_or_ones(valid, aug_logits))
    valid_mask = tf.cast(frame_valid, tf.float32)  # [N, H, W]
    if confidence_thresh != -1:
        conf_mask = tf.cast(confidence > confidence_thresh, tf.float32)  # [N, H, W]
    else:
        conf_mask = tf.ones_like(valid_mask)
    aug_logits = tf.cast(aug_logits, tf.float32)  # [N, H, W, K]
    if uda_loss == "kl":
        log_q = tf.nn.log_softmax(aug_logits, axis=-1)  # [N, H, W, K]
        div = tf.reduce_sum(tf.math.xlogy(target_prob, target_prob) - target_prob * log_q, axis=-1)
    else:
        hard_target = tf.argmax(target_prob, axis=-1, output_type=tf.int32)  # [N, H, W]
        div = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=hard_target, logits=aug_logits)
    num_valid, num_high = _global_counts(
        global_sum_fn, tf.reduce_sum(valid_mask), tf.reduce_sum(valid_mask * conf_mask)
    )
    return {
        "loss": tf.reduce_sum(valid_mask * conf_mask * div) / tf.maximum(num_valid, 1.0),
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
    valid_mask = tf.cast(targets.valid_or_ones(valid, log_prob), tf.float32)  # [N, H, W]
    (num_valid,) = _global_counts(global_sum_fn, tf.reduce_sum(valid_mask))
    return {
        "loss": tf.reduce_sum(valid_mask * entropy) / tf.maximum(num_valid, 1.0),
        "num_valid": num_valid,
    }
