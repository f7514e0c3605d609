"""Tests of the BN re-estimation diagnostic."""

import keras
import numpy as np
import tensorflow as tf

from uda_tf.experiments import bn_recalibration


def _network() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    inner = keras.Sequential(
        [keras.layers.Conv2D(2, 1, name="conv2"), keras.layers.BatchNormalization(name="bn2")],
        name="inner",
    )
    return keras.Model(inputs, inner(x))


class RecalibrateTest(tf.test.TestCase):
    def test_moving_statistics_become_those_of_the_images_layer_by_layer(self):
        keras.utils.set_random_seed(1)
        network = _network()
        images = tf.random.stateless_uniform([6, 8, 8, 3], seed=[1, 2], maxval=255.0)
        for layer in bn_recalibration.bn_layers(network):  # stale statistics
            layer.moving_mean.assign(layer.moving_mean + 5.0)
        weights = [w.numpy() for w in network.trainable_weights]
        self.assertEqual(bn_recalibration.recalibrate(network, images), 2)
        bn1 = network.get_layer("bn1")
        conv1 = network.get_layer("conv1")(images).numpy()
        self.assertAllClose(bn1.moving_mean, conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-3)
        self.assertAllClose(bn1.moving_variance, conv1.var(axis=(0, 1, 2)), rtol=1e-3)
        # bn2 sees bn1's output normalised with the batch statistics.
        normalised = (conv1 - conv1.mean((0, 1, 2))) / np.sqrt(conv1.var((0, 1, 2)) + bn1.epsilon)
        hidden = np.maximum(normalised * bn1.gamma.numpy() + bn1.beta.numpy(), 0)
        inner = network.get_layer("inner")
        conv2 = inner.get_layer("conv2")(hidden).numpy()
        bn2 = inner.get_layer("bn2")
        self.assertAllClose(bn2.moving_mean, conv2.mean(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)
        # Momenta are restored and nothing else changes.
        self.assertEqual((bn1.momentum, bn2.momentum), (0.9, 0.99))
        for before, after in zip(weights, network.trainable_weights):
            self.assertAllEqual(before, after.numpy())

    def test_a_network_without_batch_norm_is_named(self):
        inputs = keras.Input((4, 4, 3))
        network = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs), name="plain")
        with self.assertRaisesRegex(ValueError, "'plain' has no BatchNormalization"):
            bn_recalibration.recalibrate(network, tf.zeros([1, 4, 4, 3]))


if __name__ == "__main__":
    tf.test.main()
