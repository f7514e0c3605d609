"""The original UDA learning-rate schedule and optimiser.

Mirrors image/main.py (at 309e9a4): linear warmup over `warmup_steps`, then
lr * cos((7/8) * (pi/2) * clip((step - warmup) / (train_steps - warmup), 0, 1)),
so the last LR is cos(7 pi / 16) * lr ~= 0.195 * lr, not 0. SGD with Nesterov
momentum 0.9.
"""

import math

import keras
import tensorflow as tf

MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="uda_tf")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then a cosine over 7/8 of a quarter period.

    Args:
      learning_rate: the peak LR (--learning_rate).
      train_steps: total steps (--train_steps).
      warmup_steps: linear warmup steps (--warmup_steps), 0 = none.

    Raises:
      ValueError: for a non-positive LR or train_steps, or a warmup outside
        [0, train_steps].
    """

    def __init__(self, learning_rate: float, train_steps: int, warmup_steps: int = 0):
        if learning_rate <= 0:
            raise ValueError(f"--learning_rate={learning_rate!r} is invalid: expected > 0.")
        if train_steps <= 0:
            raise ValueError(f"--train_steps={train_steps!r} is invalid: expected > 0.")
        if not 0 <= warmup_steps <= train_steps:
            raise ValueError(
                f"--warmup_steps={warmup_steps!r} is invalid: expected in "
                f"[0, --train_steps={train_steps}]."
            )
        self.learning_rate = float(learning_rate)
        self.train_steps = int(train_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        warmup = float(self.warmup_steps)
        decay_steps = float(max(self.train_steps - self.warmup_steps, 1))
        fraction = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
        decay_lr = lr * tf.cos(fraction * (7.0 / 8.0) * (math.pi / 2.0))
        if self.warmup_steps == 0:
            return decay_lr
        warmup_lr = lr * step / warmup
        return tf.where(step < warmup, warmup_lr, decay_lr)

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "train_steps": self.train_steps,
            "warmup_steps": self.warmup_steps,
        }


def build_optimizer(
    *, learning_rate: float, train_steps: int, warmup_steps: int = 0
) -> keras.optimizers.SGD:
    """SGD, momentum 0.9, Nesterov, with the `WarmupCosineDecay` schedule.

    Keras's SGD keeps the velocity v = 0.9 v - lr * g (the LR inside the
    velocity); TF1's MomentumOptimizer kept a = 0.9 a + g and scaled by the
    current LR. Both are the same update for a constant LR and differ by the
    LR's change over ~10 steps otherwise, which the cosine makes negligible.

    Args:
      learning_rate: peak LR.
      train_steps: total steps.
      warmup_steps: linear warmup steps.

    Returns:
      An unbuilt `keras.optimizers.SGD`.
    """
    schedule = WarmupCosineDecay(learning_rate, train_steps, warmup_steps)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=MOMENTUM, nesterov=True)
