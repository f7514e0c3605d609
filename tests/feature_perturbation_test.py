"""Tests of UniMatch's feature perturbation (--uda_fp_coeff): uda_model and deeplabv3plus."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import uda_model_test
from uda_tf import common
from uda_tf.config import Config, DataConfig, ModelConfig, UdaConfig
from uda_tf.models.deeplabv3plus import DeepLabV3Plus, feature_parts
from uda_tf.schedules import build_optimizer
from uda_tf.uda_model import FeaturePerturbation, UdaModel, channel_dropout, fp_seeds

NUM_CLASSES = 3
SIZE = 32
UDA_FP = UdaConfig(
    unsup_ratio=1,
    uda_loss="ce",
    uda_confidence_thresh=0.34,
    uda_target="ema",
    unsup_coeff=0.5,
    uda_fp_coeff=0.5,
    uda_fp_dropout=0.5,
    seed=3,
    num_classes=NUM_CLASSES,
    train_steps=4,
)


def tiny_deeplab(seed=0, synchronized_bn=False):
    """No ASPP dropout, so that two training passes agree."""
    keras.utils.set_random_seed(seed)
    return DeepLabV3Plus(
        NUM_CLASSES,
        backbone="mobilenetv2",
        backbone_width=0.35,
        decoder_filters=8,
        dropout_rate=0.0,
        synchronized_bn=synchronized_bn,
    )


def make_batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    ori = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    ori_valid = np.ones((n, SIZE, SIZE), np.uint8)
    ori_valid[0, :10] = 0
    return {
        common.IMAGE: tf.constant(image),
        common.MASK: tf.constant((image[..., 0] // 86).astype(np.uint8)),
        common.ORI_IMAGE: tf.constant(ori),
        common.ORI_VALID: tf.constant(ori_valid),
        common.AUG_IMAGE: tf.constant(ori[:, :, ::-1]),
    }


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class FeaturePartsTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.network = tiny_deeplab()

    def test_head_of_features_is_the_network(self):
        features, head = feature_parts(self.network)
        x = tf.random.stateless_uniform([2, SIZE, 48, 3], [1, 2], 0, 255)
        low, high = features(x, training=False)
        self.assertAllClose(head([low, high, x], training=False), self.network(x, training=False))

    def test_parts_share_the_networks_variables(self):
        features, head = feature_parts(self.network)
        ids = {id(v) for v in self.network.weights}
        self.assertEqual({id(v) for v in features.weights + head.weights}, ids)
        self.assertLen(features.weights + head.weights, len(self.network.weights))

    def test_a_network_without_a_deeplab_backbone_raises(self):
        inputs = keras.Input((None, None, 3))
        unet_like = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs), name="not_deeplab")
        with self.assertRaisesRegex(TypeError, "DeepLabV3Plus.*not_deeplab"):
            feature_parts(unet_like)

    def test_uda_model_tracks_no_extra_weights(self):
        model = UdaModel(self.network, uda=UDA_FP, moving_average_decay=0.5)
        # The network's weights plus the EMA network's: the parts add none.
        self.assertLen(model.weights, 2 * len(self.network.weights))


class ChannelDropoutTest(tf.test.TestCase):
    def test_whole_channels_dropped_or_scaled(self):
        x = tf.random.stateless_uniform([3, 5, 4, 64], [0, 1], 1.0, 2.0)
        y = channel_dropout(x, 0.5, fp_seeds(0, 0, 7, 0, 3)).numpy()
        ratio = y / x.numpy()
        # Each (example, channel) has one factor over the whole plane: 0 or 2.
        per_channel = ratio.reshape(3, 20, 64)
        self.assertAllClose(per_channel, np.broadcast_to(per_channel[:, :1], per_channel.shape))
        self.assertTrue(np.all(np.isin(np.round(per_channel[:, 0], 5), [0.0, 2.0])))
        dropped = np.mean(per_channel[:, 0] == 0)
        self.assertBetween(dropped, 0.3, 0.7)
        # Different examples drop different channels.
        self.assertNotAllClose(per_channel[0, 0], per_channel[1, 0])

    def test_an_examples_mask_depends_on_its_seed_only(self):
        x = tf.ones([4, 2, 2, 32])
        seeds = fp_seeds(1, 0, 5, 0, 4)
        whole = channel_dropout(x, 0.5, seeds)
        # The second half alone, as replica 1 of 2 would see it (first = 2).
        half = channel_dropout(x[2:], 0.5, fp_seeds(1, 0, 5, 2, 2))
        self.assertAllEqual(half, whole[2:])
        self.assertAllEqual(fp_seeds(1, 0, 5, 2, 2), seeds[2:])
        # Another step, part or seed gives another mask.
        for other in (fp_seeds(1, 0, 6, 0, 4), fp_seeds(1, 1, 5, 0, 4), fp_seeds(2, 0, 5, 0, 4)):
            self.assertNotAllClose(channel_dropout(x, 0.5, other), whole)


class FpTrainStepTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.network = tiny_deeplab()
        cls.initial = [w.numpy() for w in cls.network.weights]

    def setUp(self):
        super().setUp()
        self.network.set_weights(self.initial)

    def _model(self, uda):
        model = UdaModel(self.network, uda=uda, moving_average_decay=0.5)
        model.compile(optimizer=build_optimizer(learning_rate=0.01, train_steps=uda.train_steps))
        model.optimizer.build(self.network.trainable_variables)
        return model

    def test_fp_loss_is_ce_to_the_teachers_argmax_on_the_perturbed_pass(self):
        batch = make_batch()
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        valid = batch[common.ORI_VALID].numpy().astype(bool)
        # The teacher is the EMA copy of these weights: its target before the step.
        target = self.network(ori, training=False).numpy().astype(np.float64)
        prob = np.exp(_log_softmax(target))
        # Half-way across the widest gap between the middle half of the
        # confidences: no pixel lies near the threshold, in float32 or 64.
        conf = np.sort(prob.max(-1)[valid])
        middle = conf[len(conf) // 4 : 3 * len(conf) // 4]
        gap = int(np.argmax(np.diff(middle)))
        thresh = float(middle[gap] + middle[gap + 1]) / 2
        model = self._model(dataclasses.replace(UDA_FP, uda_confidence_thresh=thresh))
        # The joint pass of step 0 on the weights before the step (the BN
        # moving statistics it updates play no part in training mode): the
        # training pass's images, concat[labeled, aug], then the originals.
        perturbation = FeaturePerturbation(self.network, rate=0.5, seed=3)
        images = tf.cast(tf.concat([batch[common.IMAGE], batch[common.AUG_IMAGE]], 0), tf.float32)
        _, fp_logits = perturbation(
            tf.concat([images, ori], 0),
            images.shape[0],
            2,
            tf.constant(0, tf.int64),
            keep_originals=False,
        )
        fp_logits = fp_logits.numpy()
        logs = model.train_step(batch)
        keep = valid & (prob.max(-1) > thresh)
        ce = -np.take_along_axis(_log_softmax(fp_logits), prob.argmax(-1)[..., None], -1)[..., 0]
        expected = np.sum(np.where(keep, ce, 0.0)) / valid.sum()
        self.assertAllClose(float(logs["unsup/fp_loss"]), expected, rtol=1e-4)
        # The pass dropped channels: it is not the plain training pass.
        plain = self.network(ori, training=True).numpy()
        self.assertGreater(np.abs(fp_logits - plain).mean(), 1e-3 * np.abs(plain).mean())
        self.assertGreater(expected, 0.0)
        # The perturbation changed the prediction.
        self.assertNotAllClose(fp_logits, self.network(ori, training=True).numpy(), atol=1e-3)

    def test_total_loss_adds_the_weighted_fp_loss(self):
        logs = self._model(UDA_FP).train_step(make_batch())
        # The weight decay is 0: sup + 0.5 * unsup + 0.5 * fp.
        self.assertAllClose(
            float(logs["total_loss"]),
            float(logs["sup/loss"])
            + 0.5 * float(logs["unsup/loss"])
            + 0.5 * float(logs["unsup/fp_loss"]),
            rtol=1e-5,
        )
        off = dataclasses.replace(UDA_FP, uda_fp_coeff=0.0)
        self.setUp()
        logs_off = self._model(off).train_step(make_batch())
        self.assertNotIn("unsup/fp_loss", logs_off)
        # The originals join the training pass's BN batch only with the term on.
        self.assertNotAllClose(logs["sup/loss"], logs_off["sup/loss"], rtol=1e-5)

    def test_the_clean_part_is_the_training_pass_over_images_and_originals(self):
        # With nothing dropped, the joint pass is network(concat[images, ori]).
        perturbation = FeaturePerturbation(self.network, rate=0.0, seed=3)
        batch = make_batch()
        images = tf.cast(batch[common.IMAGE], tf.float32)
        ori = tf.cast(batch[common.ORI_IMAGE], tf.float32)
        both = tf.concat([images, ori], 0)
        clean, fp = perturbation(both, 2, 2, tf.constant(0, tf.int64), keep_originals=False)
        whole = self.network(both, training=True)
        self.assertAllClose(tf.concat([clean, fp], 0), whole, atol=1e-5)

    # ~30 s on 2 AVX2 cores (tracing the DeepLab FP step); the eager step's goldens run by default.
    @pytest.mark.slow
    def test_a_compiled_fit_step_equals_the_eager_step(self):
        eager = self._model(UDA_FP).train_step(make_batch())
        self.setUp()
        model = self._model(UDA_FP)
        history = model.fit(
            tf.data.Dataset.from_tensors(make_batch()).repeat(), steps_per_epoch=1, verbose=0
        )
        for key in ("unsup/fp_loss", "total_loss"):
            self.assertAllClose(history.history[key][0], float(eager[key]), rtol=1e-4, msg=key)


class FpDistributedTest(tf.test.TestCase):
    @pytest.mark.slow  # ~1 min on 2 cores; fp_seeds' replica property runs by default.
    def test_mirrored_equals_one_device_with_synchronized_bn(self):
        # Each replica drops the channels of its own examples' global seeds, and
        # synchronized BN sees the global batch: two replicas train as one device.
        batch = make_batch(n=4)

        def run(strategy):
            with strategy.scope():
                network = tiny_deeplab(synchronized_bn=True)
                # No confidence mask: the untrained teacher is near uniform.
                uda = dataclasses.replace(UDA_FP, uda_confidence_thresh=-1.0)
                model = UdaModel(network, uda=uda, moving_average_decay=0.5)
                # SGD: Adam's first step is lr * sign(g), which turns the last-bit
                # differences of gradients near 0 into whole steps.
                model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
                model.optimizer.build(network.trainable_variables)
            iterator = iter(
                strategy.experimental_distribute_dataset(
                    tf.data.Dataset.from_tensors(batch).repeat()
                )
            )
            step = tf.function(model.distributed_train_step)
            # One step: synchronized BN's reductions differ in the last bits, and
            # later steps amplify that whatever the perturbation does.
            logs = step(next(iterator))
            return {k: float(v) for k, v in logs.items()}, [w.numpy() for w in network.weights]

        single_logs, single_weights = run(tf.distribute.get_strategy())
        logs, weights = run(uda_model_test.DistributedTest.mirrored())
        self.assertGreater(single_logs["unsup/fp_loss"], 0.0)
        for key, value in single_logs.items():
            self.assertAllClose(logs[key], value, rtol=1e-5, atol=1e-6, msg=key)
        for a, b in zip(single_weights, weights):
            self.assertAllClose(a, b, atol=1e-5)


class FpConfigTest(tf.test.TestCase):
    def test_invalid_values_name_the_flag(self):
        for change, flag in (
            ({"uda_fp_coeff": -1.0}, "uda_fp_coeff"),
            ({"uda_fp_dropout": 1.0}, "uda_fp_dropout"),
            ({"uda_fp_dropout": 0.0}, "uda_fp_dropout"),
            ({"unsup_ratio": 0, "uda_loss": "kl"}, "uda_fp_coeff"),
        ):
            with self.subTest(change=change), self.assertRaisesRegex(ValueError, flag):
                dataclasses.replace(UDA_FP, **change).validate()

    def test_fp_needs_deeplab(self):
        cfg = Config(
            data=DataConfig(num_classes=NUM_CLASSES, unsup_ratio=1),
            model=ModelConfig(model_name="unet", num_classes=NUM_CLASSES),
            uda=UDA_FP,
        )
        with self.assertRaisesRegex(ValueError, "uda_fp_coeff.*model_name=deeplabv3plus"):
            cfg.validate()
        dataclasses.replace(cfg, model=ModelConfig(num_classes=NUM_CLASSES)).validate()
