"""Tests of uda_tf/schedules.py: SPEC §7 LR vectors, warmup, serialization."""

import math

import keras
import tensorflow as tf
from absl.testing import parameterized

from tests import golden_values as gv
from uda_tf import schedules


class WarmupCosineDecayTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*gv.LR_VALUES)
    def test_golden(self, step, expected):
        schedule = schedules.WarmupCosineDecay(gv.LR_PEAK, gv.LR_TRAIN_STEPS, 0)
        self.assertAllClose(schedule(step), expected, atol=1e-6)

    def test_last_lr_is_cos_7pi_16_and_stays_there(self):
        schedule = schedules.WarmupCosineDecay(1.0, 100, 10)
        expected = math.cos(7 * math.pi / 16)
        self.assertAllClose(schedule(100), expected, atol=1e-6)
        self.assertAllClose(schedule(250), expected, atol=1e-6)

    def test_warmup_is_linear_then_cosine(self):
        schedule = schedules.WarmupCosineDecay(0.1, 1000, 100)
        self.assertAllClose(schedule(0), 0.0)
        self.assertAllClose(schedule(50), 0.05, atol=1e-7)
        self.assertAllClose(schedule(100), 0.1, atol=1e-7)
        fraction = (550 - 100) / 900
        self.assertAllClose(
            schedule(550), 0.1 * math.cos(fraction * 7 / 8 * math.pi / 2), atol=1e-7
        )

    def test_warmup_equal_to_train_steps(self):
        schedule = schedules.WarmupCosineDecay(0.1, 10, 10)
        self.assertAllClose(schedule(5), 0.05)
        self.assertAllClose(schedule(10), 0.1)  # no division by zero
        self.assertAllClose(schedule(11), 0.1 * math.cos(7 * math.pi / 16), atol=1e-7)

    def test_config_round_trip(self):
        schedule = schedules.WarmupCosineDecay(0.03, 5000, 200)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(schedule)
        )
        self.assertIsInstance(restored, schedules.WarmupCosineDecay)
        self.assertEqual(restored.get_config(), schedule.get_config())
        self.assertAllClose(restored(1234), schedule(1234))

    @parameterized.parameters(
        {"learning_rate": 0.0, "train_steps": 10, "warmup_steps": 0, "flag": "learning_rate"},
        {"learning_rate": 0.1, "train_steps": 0, "warmup_steps": 0, "flag": "train_steps"},
        {"learning_rate": 0.1, "train_steps": 10, "warmup_steps": 11, "flag": "warmup_steps"},
    )
    def test_bad_values_raise(self, learning_rate, train_steps, warmup_steps, flag):
        with self.assertRaisesRegex(ValueError, flag):
            schedules.WarmupCosineDecay(learning_rate, train_steps, warmup_steps)


class BuildOptimizerTest(tf.test.TestCase):
    def test_sgd_nesterov_momentum(self):
        optimizer = schedules.build_optimizer(learning_rate=0.03, train_steps=100, warmup_steps=0)
        self.assertIsInstance(optimizer, keras.optimizers.SGD)
        self.assertTrue(optimizer.nesterov)
        self.assertAllClose(optimizer.momentum, 0.9)
        self.assertIsInstance(optimizer._learning_rate, schedules.WarmupCosineDecay)

    def test_nesterov_update_by_hand(self):
        """Two steps on f(w) = w^2 / 2 (g = w), LR constant during warmup-free start."""
        optimizer = schedules.build_optimizer(learning_rate=0.1, train_steps=10**9)
        w = keras.Variable(1.0)
        velocity, expected = 0.0, 1.0
        for _ in range(2):
            optimizer.apply([tf.convert_to_tensor(w)], [w])
            grad, lr = expected, 0.1
            velocity = 0.9 * velocity - lr * grad
            expected = expected + 0.9 * velocity - lr * grad
        self.assertAllClose(w, expected, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
