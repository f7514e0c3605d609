"""Stateless seed helpers: one [2] int seed per example, split into named streams."""

import tensorflow as tf


def example_seed(base_seed: int, stream_id: int, index: tf.Tensor) -> tf.Tensor:
    """The seed of one example of one stream.

    Args:
      base_seed: the run's seed (--seed).
      stream_id: which stream (uda_tf.common.SUP_STREAM, UNSUP_STREAM, ...).
      index: int64 scalar, the example's position in the repeated stream.

    Returns:
      int64 [2], a seed for `tf.random.stateless_*`: the same arguments give
      the same seed; another index, stream or base seed gives another one.
    """
    base = tf.constant([base_seed, stream_id], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """Splits one [2] seed into `num` independent [2] seeds.

    Usage: `geo_seed, photo_seed = split_seed(seed, 2)`.
    """
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))
